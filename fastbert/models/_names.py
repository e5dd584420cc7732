"""The supported model types and their class-name prefixes (data only: imported by the Auto
dispatcher and by the models' error messages, so neither needs the other)."""

from __future__ import annotations

_FAMILIES = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta", "camembert": "Camembert",
             "electra": "Electra", "modernbert": "ModernBert", "distilbert": "DistilBert"}
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)


def class_for(model_type: str, class_name: str) -> str:
    """The name of the class of ``model_type``'s family matching ``class_name``'s head (for errors)."""
    if model_type not in _FAMILIES:
        return f"a supported model_type {list(SUPPORTED_MODEL_TYPES)} (got {model_type!r})"
    for family in sorted(_FAMILIES.values(), key=len, reverse=True):
        if class_name.startswith(family):
            return _FAMILIES[model_type] + class_name[len(family):]
    return _FAMILIES[model_type] + "Model"
