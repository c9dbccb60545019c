"""DeFINE inside Hugging Face `transformers` models (optional extra `[hf]`, transformers 5.4 to 5.x).

    from define_kernels.integrations.transformers import use_define, from_pretrained

    report = use_define(model, map_dim=128, expand_dim=1024, depth=4, max_groups=8)
    print(report)                          # parameters before -> after
    model.save_pretrained(path)
    model = from_pretrained(path)          # transformers' loader, with DeFINE modules rebuilt first

`use_define` works on a `PreTrainedModel` with input embeddings (GPT-2, Llama and other decoder
families, their base models and classification / QA heads). It replaces the input embeddings by a
`DeFINE` of the same vocabulary and width and, by default, the output head by a `TiedOutput`:
logits = (h P) E^T with E the DeFINE map table and P a bias-free m -> n projection
(docs/math.md §4), the padding row read as zero. `tie="none"` keeps the model's own head as an
untied [V, H] matrix instead. The model's tying config is switched off and its declared ties
pruned to what still exists (the head reads the map table itself), so `tie_weights()` is a
no-op, and `resize_token_embeddings` is replaced on the instance by one that grows or shrinks
the map table (and the head). The settings are written to `model.config.define_kernels`;
`from_pretrained` reads them back.

`transformers.AutoModel*.from_pretrained` on such a checkpoint would build nn.Embedding and drop
the DeFINE weights: load it with this package's `from_pretrained`, which takes the same
arguments. What differs from an nn.Embedding model, and why: docs/huggingface.md.
"""
try:
    import transformers  # noqa: F401  (absolute: the library, not this package)
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "define_kernels.integrations.transformers needs the `transformers` package; install the "
        "extra: pip install 'define-kernels[hf]' (or pip install transformers)") from error

from .convert import (CONFIG_KEY, ConversionReport, DeFINESizeWarning, PaddedTiedOutput,  # noqa: E402
                      count_parameters, use_define)
from .loading import MIN_TRANSFORMERS, from_pretrained  # noqa: E402
from .vocab import define_embedding, init_map_rows, resize_token_embeddings  # noqa: E402

__all__ = ["CONFIG_KEY", "ConversionReport", "DeFINESizeWarning", "MIN_TRANSFORMERS", "PaddedTiedOutput",
           "count_parameters", "define_embedding", "from_pretrained", "init_map_rows",
           "resize_token_embeddings", "use_define"]
