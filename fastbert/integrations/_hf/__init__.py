"""The pieces of :mod:`fastbert.integrations.transformers` (its public face): ``attention`` (the
``attn_implementation="fastbert"`` attention and mask functions), ``encoder`` (the unpadded route
and the mask check every family shares), ``bert`` (BERT-layout families, DistilBERT), ``modernbert``."""
