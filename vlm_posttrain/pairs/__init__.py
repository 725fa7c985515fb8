"""The pairs stage: K sampled answers per train prompt, judged in pairs, as DPO preference data.

Modules (import from them; this package re-exports nothing):

* ``stage``: the stage's work on pandas batches, without Ray (``generate_samples``, ``judge_samples``,
  ``write_outputs``, the bias diagnostics); ``ray_jobs/pairs.py`` runs it on Ray Data actor pools.
* ``judges``: the pairwise judges (``self``, ``critic``, ``reference``) behind one protocol that shows every
  pair in both orders, and the tournament that turns verdicts into best and worst samples.
"""
