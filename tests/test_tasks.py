"""Classification tasks for transfer: offline sources, one-line errors, splits by group, metrics."""

import numpy as np
import pytest

from clso import ClsoError
from clso.data.tasks import TaskFileError, connected_groups, load_task, split_record, split_task, task_metric


def test_rotten_tomatoes_ships_offline_with_its_movies_and_texts_as_groups():
    task = load_task("rotten_tomatoes")
    assert task.label_names == ("rotten", "fresh") and len(task.texts) > 10_000
    assert all(t.strip() for t in task.texts) and set(task.labels) == {0, 1}
    assert len(set(task.groups)) > 400  # movies, joined where two share a snippet
    group_of_text = {}
    for text, group in zip(task.texts, task.groups):
        assert group_of_text.setdefault(text, group) == group  # a text under two movies: one group


def test_debates_2016_is_a_three_class_offline_task():
    task = load_task("debates_2016")
    assert task.label_names == ("Democratic", "Republican", "Moderator") and len(task.texts) > 1000
    counts = np.bincount(task.labels)
    assert len(counts) == 3 and counts.min() > 200
    assert task.groups == task.texts  # a statement said twice ("Governor Pence?") sits in one split


def test_connected_groups_join_examples_that_share_any_key():
    groups = connected_groups(["m1", "m1", "m2", "m3", "m4"], ["a", "b", "b", "c", "c"])
    assert groups[0] == groups[1] == groups[2] and groups[3] == groups[4] and groups[0] != groups[3]


def test_splits_keep_each_group_whole_cover_everything_once_and_follow_the_seed():
    task = load_task("rotten_tomatoes")
    splits = split_task(task, 0.1, 0.1, seed=3)
    everything = np.concatenate(list(splits.values()))
    assert sorted(everything.tolist()) == list(range(len(task.texts)))
    groups = {name: {task.groups[i] for i in idx} for name, idx in splits.items()}
    assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"] and not groups["val"] & groups["test"]
    again = split_task(task, 0.1, 0.1, seed=3)
    assert all(np.array_equal(splits[k], again[k]) for k in splits)
    other = split_task(task, 0.1, 0.1, seed=4)
    assert not np.array_equal(splits["test"], other["test"])
    record = split_record(task, splits)
    assert record["test"]["examples"] == len(splits["test"]) and sum(record["test"]["labels"].values()) == len(splits["test"])


def write(tmp_path, text):
    path = tmp_path / "task.tsv"
    path.write_text(text, encoding="utf-8")
    return f"file:{path}"


def test_a_task_file_is_labels_and_texts(tmp_path):
    task = load_task(write(tmp_path, "label\ttext\npos\tgood film\nneg\tbad film\n\npos\tfine\n"))
    assert task.label_names == ("neg", "pos") and task.labels == (1, 0, 1) and task.texts[2] == "fine"


@pytest.mark.parametrize("content, message", [
    ("label\ttext\npos\tgood\nbad label\tawful\n", r"task.tsv:3: bad label 'bad label'"),
    ("label\ttext\npos\tgood\nneg\t   \n", r"task.tsv:3: empty text for label 'neg'"),
    ("label\ttext\npos good\n", r"task.tsv:2: no tab between label and text"),
    ("text\tlabel\ngood\tpos\n", r"task.tsv:1: the header must be `label<TAB>text`"),
    ("label\ttext\npos\tgood\npos\tfine\n", r"1 distinct label\(s\) in 2 examples"),
])
def test_a_bad_task_file_is_one_line_with_exit_status_2(tmp_path, content, message):
    with pytest.raises(TaskFileError, match=message) as caught:
        load_task(write(tmp_path, content))
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value)


def test_glue_without_the_hub_is_one_clear_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ClsoError, match=r"task glue/sst2: cannot load nyu-mll/glue/sst2 .* use an offline task "
                                        r"\(rotten_tomatoes, debates_2016\) or file:PATH") as caught:
        load_task("glue/sst2")
    assert "\n" not in str(caught.value)
    with pytest.raises(ClsoError, match="unknown task 'glue/qqp'"):
        load_task("glue/qqp")


def test_glue_keeps_its_validation_as_test_and_cuts_val_from_train(monkeypatch):
    import datasets

    rows = lambda n: [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": i % 3} for i in range(n)]  # noqa: E731
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: {
        "train": rows(50), "validation_matched": rows(7), "validation_mismatched": rows(5)})
    task = load_task("glue/mnli")
    assert task.texts[3] == ("p3", "h3") and task.label_names == ("entailment", "neutral", "contradiction")
    splits = split_task(task, 0.2, 0.2, seed=0)
    assert len(splits["test"]) == 7 and len(splits["test_mismatched"]) == 5
    assert len(splits["val"]) == 10 and len(splits["train"]) == 40  # test comes from GLUE, not from train


def test_mnli_pairs_of_one_premise_share_a_split(monkeypatch):
    import datasets

    rows = [{"premise": f"p{i // 3}", "hypothesis": f"h{i}", "label": i % 3} for i in range(60)]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: {
        "train": rows, "validation_matched": rows[:3], "validation_mismatched": rows[:3]})
    task = load_task("glue/mnli")
    splits = split_task(task, 0.2, 0.2, seed=1)
    premise_split = {}
    for split in ("train", "val"):
        for i in splits[split]:
            assert premise_split.setdefault(task.texts[i][0], split) == split
    assert len(splits["val"]) == 12  # 4 of the 20 premises, with their 3 hypotheses each


def test_glue_offline_in_a_real_process_is_one_line(tmp_path, stage_env):
    """No mock: `datasets` itself, with the hub switched off and an empty cache, through the stage."""
    import subprocess
    import sys

    import yaml

    from tests.conftest import REPO

    raw = yaml.safe_load((REPO / "tests/params_tiny.yaml").read_text())
    raw["transfer"]["tasks"] = ["glue/cola"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**stage_env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run([sys.executable, "-m", "stages.transfer"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    [line] = run.stderr.strip().splitlines()
    assert line.startswith("clso transfer: error: task glue/cola: cannot load nyu-mll/glue/cola") and "HF_HOME" in line
    assert not (tmp_path / "metrics").exists()


def test_matthews_correlation_by_hand():
    # TP 2, TN 2, FP 1, FN 0: (2·2 − 1·0) / √(3·2·3·2) = 2/3
    assert task_metric("matthews", [0, 1, 1, 0, 1], [0, 1, 0, 0, 1]) == pytest.approx(2 / 3)
    assert task_metric("matthews", [1, 1, 1], [0, 1, 0]) == 0.0  # a constant guess carries no information
    assert task_metric("matthews", [0, 1, 2, 2], [0, 1, 2, 2]) == pytest.approx(1.0)
    assert task_metric("accuracy", [0, 1, 1], [0, 1, 0]) == pytest.approx(2 / 3)


def test_params_name_every_task_the_loader_knows():
    from clso.data.tasks import GLUE
    from clso.params import GLUE_TASKS, OFFLINE_TASKS

    assert tuple(GLUE) == GLUE_TASKS
    assert all(load_task(name).name == name for name in OFFLINE_TASKS)
