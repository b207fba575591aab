"""The finetune plugin: ``btkit train``, ``btkit export-gguf`` and ``btkit loop``.

Supervised finetuning on btkit pairs with TRL's SFTTrainer (Hugging Face Trainer underneath), the
export of a finetune back to GGUF, and the papers' self-training loops (Humpback M0 -> M1 -> M2,
Self-Lengthen, Cycle-Instruct). torch, transformers, trl and peft are imported only when a command
runs (the ``btkit[train]`` extra).
"""

from btkit.hookspecs import hookimpl


@hookimpl
def btkit_register_commands(cli):
    from .commands import register

    register(cli)
