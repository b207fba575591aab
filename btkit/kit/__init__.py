"""The plugin author's kit: what methods and backends share, public and documented.

- :mod:`btkit.kit.judges`: the one judge-mode vocabulary every judging stage and ``--judge-mode``
  use (``JUDGE_MODES``: auto, rubric, logprob, pmi, ifd; ``auto`` decided by ``resolve_judge_mode``
  alone), :class:`~btkit.kit.judges.JudgingStage` (a stage that declares the modes it supports),
  score parsing, keep rules (threshold, keep-top), the :class:`~btkit.kit.judges.Curator` and the
  generic :class:`~btkit.kit.judges.PairCurateStage` with its options.
- :mod:`btkit.kit.verdict`: yes/no verdicts in the rubric or logprob judge mode.
- :mod:`btkit.kit.segment`: splitting documents into segments in bounded memory, with de-duplication.
- :mod:`btkit.kit.instructions`: cleaning a generated instruction (labels, quotes, fences, copies).
- :mod:`btkit.kit.seeds`: seed pairs and reproducible few-shot choices.
- :mod:`btkit.kit.text`: words, sentences, paragraphs, ROUGE-L and near-duplicates.
- :mod:`btkit.kit.models`: where the embedded default model lies (llama.cpp and finetuning load it).
- :mod:`btkit.kit.http`: what remote backends share: settings, retries with a run-wide budget,
  Retry-After, one aiohttp session, secret redaction.

A first-party plugin imports ``btkit.*`` and its own package only; what two plugins need belongs here.
"""
