"""The soup stage: exact averaging ("soup") of PEFT LoRA adapters, working on the adapter folders alone.

Modules (import from them; this package re-exports nothing):

* ``adapters``: read a PEFT LoRA adapter folder (``load_adapter`` -> ``Adapter``: factors and scales per
  module) and write a combined one (``write_adapter`` of a ``SoupResult``).
* ``methods``: the soups ``delta_mean`` (exact mean of the ΔW), ``delta_svd`` (that mean truncated by SVD),
  ``factor_mean`` (the labelled baseline) and ``greedy`` (greedy soup), with their math.
* ``check``: the numerical ``self_check``, and ``make_soup``, which refuses to write a soup that fails it.
* ``select``: ``select_adapters`` chooses the trials from the SFT trial table (all, top_k, best_rank).
* ``stage``: ``build_soup`` / ``soup_payload``, the work of the Ray task ``ray_jobs/soup.py`` runs.
* ``val_loss``: ``ValLoss``, the validation loss of base + adapter, exactly as the SFT trials were scored.

Usage::

    from vlm_posttrain.soup.adapters import load_adapter, write_adapter
    from vlm_posttrain.soup.check import self_check
    from vlm_posttrain.soup.methods import delta_mean

    adapters = [load_adapter(p) for p in ["runs/a/adapter", "runs/b/adapter"]]
    soup = delta_mean(adapters)                   # or delta_svd(adapters, rank=16)
    assert self_check(soup, adapters)["passed"]
    write_adapter(soup, "runs/soup/adapter")      # then PeftModel.from_pretrained(base, that folder)

The stage entry points pick the ingredients from the SFT trial table and refuse to write a soup whose
self-check fails::

    chosen = select_adapters(trials, "best_rank", rank_metric="best")
    path, report = make_soup([load_adapter(sft_dir / row["adapter"]) for row in chosen.rows], "delta_mean", out)

``adapters``, ``methods``, ``check`` and ``select`` need no base model and import neither ``peft`` nor
``ray``; ``stage`` and ``val_loss`` load the base model to score a soup.
"""
