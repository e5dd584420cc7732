"""fastbert's own Auto classes: ``AutoConfig.from_pretrained(path).model_type`` -> the fastbert class.

The table mirrors transformers' ``MODEL_MAPPING_NAMES`` / ``MODEL_FOR_*_MAPPING_NAMES`` for the
supported families (so e.g. RoBERTa's ``AutoModelForPreTraining`` is its ``ForMaskedLM`` and
ELECTRA's is the discriminator). Nothing is registered into transformers' Auto classes (that
would hijack plain transformers for the whole process) and no checkpoint needs
``trust_remote_code``: saved ``architectures`` name transformers' own classes.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

from fastbert.models import bert, distilbert, electra, modernbert, roberta
from fastbert.models._names import _FAMILIES, SUPPORTED_MODEL_TYPES

_CLASSES = {name: obj for module in (bert, distilbert, electra, modernbert, roberta)
            for name, obj in vars(module).items() if isinstance(obj, type)}

# task -> (suffix per family); a family missing from a task has no such head (in transformers, or
# not yet in fastbert: ModernBERT's question answering and multiple choice).
_HEADLESS = {"AutoModelForQuestionAnswering": ("modernbert",), "AutoModelForMultipleChoice": ("modernbert",)}
_TASKS = {
    "AutoModel": {t: "Model" for t in _FAMILIES},
    "AutoModelForPreTraining": {"bert": "ForPreTraining", "electra": "ForPreTraining", "roberta": "ForMaskedLM",
                                "xlm-roberta": "ForMaskedLM", "camembert": "ForMaskedLM",
                                "distilbert": "ForMaskedLM"},
    "AutoModelForMaskedLM": {t: "ForMaskedLM" for t in _FAMILIES},
    "AutoModelForSequenceClassification": {t: "ForSequenceClassification" for t in _FAMILIES},
    "AutoModelForTokenClassification": {t: "ForTokenClassification" for t in _FAMILIES},
    "AutoModelForQuestionAnswering": {t: "ForQuestionAnswering" for t in _FAMILIES
                                      if t not in _HEADLESS["AutoModelForQuestionAnswering"]},
    "AutoModelForMultipleChoice": {t: "ForMultipleChoice" for t in _FAMILIES
                                   if t not in _HEADLESS["AutoModelForMultipleChoice"]},
    "AutoModelForNextSentencePrediction": {"bert": "ForNextSentencePrediction"},
}


def model_class(model_type: str, task: str = "AutoModel"):
    """The fastbert class for ``model_type`` and an Auto class name ``task``.

    Raises:
        ValueError: ``model_type`` not supported (the supported list is named), or the family has
            no such head.
    """
    if model_type not in _FAMILIES:
        raise ValueError(f"model_type: fastbert supports {list(SUPPORTED_MODEL_TYPES)}, got {model_type!r}")
    suffix = _TASKS[task].get(model_type)
    if suffix is None:
        have = [t for t, m in _TASKS[task].items()]
        raise ValueError(f"{task}: model_type {model_type!r} has no such head (transformers has it for {have})")
    return _CLASSES[_FAMILIES[model_type] + suffix]


class _AutoFastbert:
    """``from_pretrained(path, **kwargs)`` / ``from_config(config, **kwargs)`` dispatch on model_type."""

    def __init__(self):
        raise EnvironmentError(f"{type(self).__name__} is built by from_pretrained(path) or from_config(config)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        config = kwargs.get("config")
        if not isinstance(config, PreTrainedConfig):
            hub = {k: kwargs[k] for k in ("cache_dir", "revision", "local_files_only", "token", "subfolder")
                   if k in kwargs}
            config_dict, _ = PreTrainedConfig.get_config_dict(config or pretrained_model_name_or_path, **hub)
            model_type = config_dict.get("model_type")
        else:
            model_type = config.model_type
        return model_class(model_type, cls.__name__).from_pretrained(pretrained_model_name_or_path, *model_args,
                                                                      **kwargs)

    @classmethod
    def from_config(cls, config: PreTrainedConfig, **kwargs):
        return model_class(config.model_type, cls.__name__)(config, **kwargs)


def _auto(name: str):
    return type(name, (_AutoFastbert,), {"__module__": __name__,
                                         "__doc__": f"fastbert's {name}: model_type -> fastbert class."})


AutoModel = _auto("AutoModel")
AutoModelForPreTraining = _auto("AutoModelForPreTraining")
AutoModelForMaskedLM = _auto("AutoModelForMaskedLM")
AutoModelForSequenceClassification = _auto("AutoModelForSequenceClassification")
AutoModelForTokenClassification = _auto("AutoModelForTokenClassification")
AutoModelForQuestionAnswering = _auto("AutoModelForQuestionAnswering")
AutoModelForMultipleChoice = _auto("AutoModelForMultipleChoice")
AutoModelForNextSentencePrediction = _auto("AutoModelForNextSentencePrediction")

__all__ = ["AutoModel", "AutoModelForPreTraining", "AutoModelForMaskedLM", "AutoModelForSequenceClassification",
           "AutoModelForTokenClassification", "AutoModelForQuestionAnswering", "AutoModelForMultipleChoice",
           "AutoModelForNextSentencePrediction", "SUPPORTED_MODEL_TYPES", "model_class"]
