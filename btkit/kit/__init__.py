"""The plugin author's kit: what methods and backends share, public and documented.

- :mod:`btkit.kit.judges`: scoring (instruction, response) pairs with one mode vocabulary (rubric,
  logprob, pmi, ifd; ``auto`` picks logprob where the backend can), score parsing, keep rules
  (threshold, keep-top), and the :class:`~btkit.kit.judges.Curator` every curate stage uses.
- :mod:`btkit.kit.verdict`: yes/no verdicts, read from logprobs or a generated label.
- :mod:`btkit.kit.segment`: splitting documents into segments in bounded memory, with de-duplication.
- :mod:`btkit.kit.instructions`: cleaning a generated instruction (labels, quotes, fences, copies).
- :mod:`btkit.kit.seeds`: seed pairs and reproducible few-shot choices.
- :mod:`btkit.kit.text`: words, sentences, paragraphs, ROUGE-L and near-duplicates.
- :mod:`btkit.kit.http`: what remote backends share: settings, retries with a run-wide budget,
  Retry-After, one aiohttp session, secret redaction.

A first-party plugin imports ``btkit.*`` and its own package only; what two plugins need belongs here.
"""
