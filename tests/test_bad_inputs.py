"""Bad inputs end in a one-line error naming the input and the fix, or a counted skip, and never a half artifact.

Walks the corpus in tests/bad_inputs/ (its cases.yaml says what each input is and what must come out) through
the drivers' own ``main`` (config, data, model) or the core entry points (SFT examples, soup), with the
drivers' error handler (``ray_jobs.session.cli``): exit code 2, ``error: ...`` as the last stderr line, no
traceback, and nothing registered or left behind under the run root.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from ray_jobs import data as data_job
from ray_jobs import model as model_job
from ray_jobs.session import cli, user_error

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "bad_inputs"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text())
TINY = str(REPO / "configs" / "tiny.yaml")


def _cases(*kinds: str) -> list[str]:
    return [name for name, case in CASES.items() if case["kind"] in kinds]


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 32), "steelblue").save(buf, format="PNG")
    return buf.getvalue()


def _folder(name: str, tmp_path: Path) -> Path:
    """A copy of the case's folder with its good images drawn in."""
    folder = shutil.copytree(CORPUS / name, tmp_path / name)
    if "images/chart.png" in (folder / "annotations.jsonl").read_bytes().decode("utf-8", "replace"):
        (folder / "images").mkdir(exist_ok=True)
        (folder / "images" / "chart.png").write_bytes(_png())
    return folder


def _jsonl_overrides(folder: Path, root: Path, policy: str) -> list[str]:
    return [
        f"run.root={root}",
        "data.source=jsonl",
        f"data.path={folder}",
        "data.limit=0",
        "data.val_fraction=0",
        "data.test_fraction=0",
        f"data.bad_rows={policy}",
    ]


def _fails(capsys, main, *args) -> str:
    """Run a driver (or an entry point wrapped like one) expecting the one-line error; returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(*args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    return last


def _assert_message(line: str, expected: list[str]) -> None:
    for part in expected:
        assert part in line, f"{part!r} not in {line!r}"


def _assert_nothing_registered(root: Path) -> None:
    leftovers = [p for p in root.glob("*/*")] if root.exists() else []
    assert not leftovers, f"partial artifacts left: {leftovers}"


@pytest.mark.parametrize("name", _cases("data"))
def test_bad_data_is_counted_or_refused(name, tmp_path, capsys):
    case = CASES[name]
    folder = _folder(name, tmp_path)
    if "skip" in case:
        root = tmp_path / "skip-run"
        data_job.main([TINY, *_jsonl_overrides(folder, root, "skip")])
        (artifact,) = root.glob("data/data-*")
        metrics = yaml.safe_load((artifact / "manifest.json").read_text())["metrics"]
        assert metrics["rejects"]["reasons"] == case["skip"]
        rows = sum(1 for line in (folder / "annotations.jsonl").read_text().splitlines() if line.strip())
        assert sum(metrics["rows"].values()) == rows - sum(case["skip"].values())
        capsys.readouterr()
    root = tmp_path / "fail-run"
    line = _fails(capsys, data_job.main, [TINY, *_jsonl_overrides(folder, root, "fail")])
    _assert_message(line, case["error"])
    _assert_nothing_registered(root)


@pytest.mark.parametrize("name", _cases("config"))
def test_bad_config_is_refused(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    case = CASES[name]
    root = tmp_path / "run"
    config = str(CORPUS / case["file"]) if "file" in case else TINY
    line = _fails(capsys, data_job.main, [config, f"run.root={root}", *case.get("overrides", [])])
    _assert_message(line, case["error"])
    _assert_nothing_registered(root)


@pytest.mark.parametrize("name", _cases("model"))
def test_bad_model_is_refused_before_any_work(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    case = CASES[name]
    root = tmp_path / "run"
    line = _fails(capsys, model_job.main, [TINY, f"run.root={root}", *case["overrides"]])
    _assert_message(line, case["error"])
    _assert_nothing_registered(root)


@pytest.mark.parametrize("name", _cases("sft"))
def test_example_too_long_for_its_image_tokens(name, tiny_model_dir, tmp_path, capsys):
    from vlm_posttrain import modeling
    from vlm_posttrain.data import load_split
    from vlm_posttrain.sft import to_sft_dataset

    case = CASES[name]
    root = tmp_path / "run"
    data_job.main([TINY, *_jsonl_overrides(_folder(name, tmp_path), root, "skip")])
    (data_dir,) = root.glob("data/data-*")
    rows = load_split(data_dir, "train")
    processor = modeling.load_processor(str(tiny_model_dir))
    dataset, rejects = to_sft_dataset(rows, processor, case["max_length"], "skip")
    assert dict(rejects.counts) == case["skip"] and len(dataset) == len(rows) - 1
    capsys.readouterr()
    line = _fails(capsys, cli(to_sft_dataset), rows, processor, case["max_length"], "fail")
    _assert_message(line, case["error"])


@pytest.mark.parametrize("name", _cases("soup"))
def test_bad_soup_input_is_refused(name, tmp_path, capsys):
    from vlm_posttrain.soup.adapters import load_adapter
    from vlm_posttrain.soup.methods import delta_mean

    case = CASES[name]
    if "adapter" in case:
        line = _fails(capsys, cli(load_adapter), tmp_path / case["adapter"])
    else:
        line = _fails(capsys, cli(delta_mean), [])
    _assert_message(line, case["error"])


def _pairs_folder(case: dict, data_dir: Path, folder: Path) -> Path:
    """A pairs artifact folder: the case's preference rows from the tiny data, and the pairs stage's counts."""
    import json

    import pandas as pd

    from vlm_posttrain import prompts
    from vlm_posttrain.data import load_split

    rows = []
    for i, row in enumerate(load_split(data_dir, "train").head(case["pairs"]).to_dict("records")):
        conversations = list(row["conversations"])
        long = i < case.get("long", 0)
        rejected = "much longer " * 300 if long else "No."
        rows.append(
            {
                "images": [row["image"]],
                "prompt": prompts.preference_prompt(conversations),
                "chosen": prompts.preference_completion(prompts.final_answer(conversations)),
                "rejected": prompts.preference_completion(rejected),
                "example_id": f"long-{i}" if long else row["example_id"],
            }
        )
    folder.mkdir(parents=True)
    frame = pd.DataFrame(rows, columns=["images", "prompt", "chosen", "rejected", "example_id"])
    frame.to_parquet(folder / "pairs.parquet", index=False)
    diagnostics = {"ties": {"k": 30, "n": 32}, "unparsed": {"k": 2, "n": 64}}
    metrics = {"prompts": 32, "pairs": case["pairs"], "diagnostics": diagnostics}
    (folder / "manifest.json").write_text(json.dumps({"metrics": metrics}))
    return folder


@pytest.mark.parametrize("name", _cases("dpo"))
def test_bad_preference_pairs_are_counted_or_refused_before_any_trial(
    name, tiny_model_dir, tiny_data_dir, tiny_config, tmp_path, capsys
):
    from ray_jobs import dpo as dpo_job

    case = CASES[name]
    folder = _pairs_folder(case, tiny_data_dir, tmp_path / "pairs-case")
    dpo = {"max_length": case.get("max_length", 256)}
    if "skip" in case:
        counts = dpo_job.check_pairs(tiny_config(dpo=dpo), str(tiny_model_dir), str(folder))
        assert counts["pairs_too_long"] == case["skip"]["too_long"] and counts["pairs_in"] == case["pairs"]
        capsys.readouterr()
    cfg = tiny_config(dpo=dpo, data={"bad_rows": "fail"})
    line = _fails(capsys, cli(dpo_job.check_pairs), cfg, str(tiny_model_dir), str(folder))
    _assert_message(line, case["error"])


def test_corpus_covers_every_kind_of_bad_input():
    assert set(CASES) >= {
        "corrupt_image",
        "oversized_image",
        "missing_image",
        "no_question",
        "no_answer",
        "non_utf8",
        "too_long",
        "duplicate_ids",
        "empty",
        "unknown_key",
        "wrong_type",
        "soup_zero_adapters",
        "missing_adapter_folder",
        "model_path_missing",
        "hub_model_offline",
        "dpo_no_pairs",
        "dpo_too_long",
    }


def test_only_input_problems_become_one_line_errors():
    """The handler shortens the project's own errors (also from a Ray task) and leaves bugs their traceback."""
    from ray.exceptions import RayTaskError

    from vlm_posttrain.config import load_config
    from vlm_posttrain.data import DataError
    from vlm_posttrain.soup.methods import delta_mean

    with pytest.raises(ValueError) as ours:
        delta_mean([])
    assert user_error(ours.value) == "no adapters selected: the soup needs at least one ingredient"
    with pytest.raises(ValueError) as library:
        int("not a number")  # a ValueError from outside the project is a bug, not an input problem
    assert user_error(library.value) is None
    with pytest.raises(Exception) as config:
        load_config(CORPUS / "configs" / "wrong_type.yaml")
    assert "sft.epochs" in user_error(config.value)
    remote = RayTaskError("train", "Traceback ...\nDataError: row 'x'", DataError("row 'x': bad\nimage"))
    assert user_error(remote.as_instanceof_cause()) == "row 'x': bad image"
    assert user_error(RayTaskError("f", "Traceback ...", KeyError("k")).as_instanceof_cause()) is None
