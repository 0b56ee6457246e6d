"""benchmarks/reproduce.py, the reproduction campaign's runner, on tiny recipes in a temporary folder.

Never touches benchmarks/runs/ or benchmarks/results/: every path is passed explicitly.
"""

import importlib.util
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("reproduce", REPO / "benchmarks" / "reproduce.py")
rp = importlib.util.module_from_spec(_spec)
sys.modules["reproduce"] = rp  # dataclasses look their module up there
_spec.loader.exec_module(rp)



LONG = 100_000  # epochs of the row that must still be training when a test stops it

def tiny_recipe(root: Path, epochs: int = 2) -> dict:
    return {
        "name": "tiny", "seed": 0,
        "data": {"name": "image_folder", "root": str(root), "image_size": 16, "in_memory": "always",
                 "augment": "cifar"},
        "model": {"backbone": "tiny"},
        "stages": [{"name": "main", "method": "ce", "epochs": epochs, "batch_size": 8, "optim": {"lr": 0.05},
                    "schedule": {"name": "cosine"}}],
        "eval": {"batch_size": 16, "many_above": 20, "few_below": 5, "plots": False},
    }


@pytest.fixture
def campaign_dir(tmp_path, image_folder):
    (tmp_path / "stage1.yaml").write_text(yaml.safe_dump(tiny_recipe(image_folder)))
    # Far longer than any test waits: the SIGINT and --hours stops below must find it unfinished however fast the
    # machine trains the tiny recipe (400 epochs once finished inside the 14 s of --hours 0.004 on a quiet CPU).
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(tiny_recipe(image_folder, epochs=LONG)))
    stage2 = tiny_recipe(image_folder)
    stage2["stages"] = [{"name": "classifier", "method": {"name": "tau_norm", "tau": 1.0}, "epochs": 0,
                         "batch_size": 8}]
    (tmp_path / "stage2.yaml").write_text(yaml.safe_dump(stage2))
    (tmp_path / "README.md").write_text(f"# x\n\nbefore\n\n{rp.README_BEGIN}\nold\n{rp.README_END}\n\nafter\n")
    return tmp_path


def write_table(d: Path, rows: list[dict], overrides=()) -> Path:
    path = d / "table.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"overrides": list(overrides), "tolerance": 2.0}, "rows": rows}))
    return path


def args(d: Path, *extra: str) -> list[str]:
    return ["--table", str(d / "table.yaml"), "--runs", str(d / "runs"), "--results", str(d / "results"),
            "--readme-file", str(d / "README.md"), *extra]


ROWS = [
    {"name": "base", "title": "Tiny CE", "recipe": None, "seed": 0, "keep": True,
     "paper": {"top1": 0.0, "source": "a paper"}},
    {"name": "tau", "title": "tau-norm on it", "recipe": None, "after": "base", "seed": 0,
     "paper": {"top1": 100.0, "base": 10.0, "source": "an optimistic paper", "tolerance": 0.5},
     "variants": [{"name": "tau0", "title": "tau 0", "set": ["method.tau=0"], "paper": {"top1": 0.0, "source": "s"}}],
     "bar": {"gain_over": "tau0", "points": -100}},
]


def rows_for(d: Path) -> list[dict]:
    rows = json.loads(json.dumps(ROWS))
    rows[0]["recipe"], rows[1]["recipe"] = str(d / "stage1.yaml"), str(d / "stage2.yaml")
    return rows


def test_table_errors_name_the_row_and_key(tmp_path):
    good = {"name": "a", "recipe": "cifar10_lt/ce"}
    cases = [
        ([{**good, "epochs": 3}], "unknown key(s) epochs"),
        ([good, good], "duplicate row name"),
        ([{**good, "after": "b"}], "after: 'b' must name an earlier row"),
        ([{**good, "overrides": ["seed=3"]}], "set the seed with `seed:`"),
        ([{**good, "name": "Bad-Name"}], "name must be lower_snake"),
        ([{"name": "a"}], "needs a name and a recipe"),
        ([{**good, "bar": {"gain_over": "x", "points": 5}}], "bar.gain_over must name one of the row's variants"),
        ([{**good, "variants": [{"name": "v"}]}], "each variant needs a name and set"),
        ([{**good, "optional": " "}], "optional: says why the row runs only when named"),
    ]
    for rows, msg in cases:
        with pytest.raises(rp.TableError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            rp.load_table(write_table(tmp_path, rows))
    assert rp.main(["--table", str(write_table(tmp_path, [good])), "--only", "nope", "--status"]) == 2


def test_the_shipped_table_loads_and_names_existing_recipes():
    from longtail.engine.build import load_config

    table = rp.load_table(REPO / "benchmarks" / "reproduce.yaml")
    assert [r.name for r in table.rows[:2]] == ["ce", "tde"]  # rows 1 and 2 of the issue come first
    for row in table.rows:
        # Every row builds a valid config (the stage-1 folder of stage-2 rows is checked when they start).
        cfg = load_config(str(REPO / row.recipe) if (REPO / row.recipe).is_file() else row.recipe,
                          [*table.overrides, *row.overrides, f"seed={row.seed}"])
        assert cfg.seed == row.seed and cfg.amp is False, row.name
    assert {r.name for r in table.rows if r.keep} == {"ce", "tde"}


def test_campaign_orders_rows_waits_for_stage1_records_and_prunes(campaign_dir, capsys):
    d = campaign_dir
    write_table(d, rows_for(d))
    # The stage-2 row alone waits for its stage 1: nothing trains.
    assert rp.main(args(d, "--only", "tau", "--parallel", "1")) == 0
    assert "waiting for their stage 1: tau" in capsys.readouterr().out
    assert not (d / "runs" / "tau").exists()

    assert rp.main(args(d, "--parallel", "1")) == 0
    out = capsys.readouterr().out
    assert "finished base" in out and "finished tau" in out
    base = json.loads((d / "results" / "repro_base.json").read_text())
    tau = json.loads((d / "results" / "repro_tau.json").read_text())
    for rec in (base, tau):
        assert rec["command"].startswith("longtail train ") and rec["commit"] is not None
        assert rec["device"].startswith("cpu") and rec["seed"] == 0 and rec["split"] == "test"
        # one process: its log spans about its own train_seconds
        assert rec["train_seconds"] >= 0 and abs(rec["train_seconds"] - rec["train_seconds_last_process"]) < 5
    assert base["reproduction"]["met"] is True and tau["reproduction"]["met"] is False
    assert f"init_from={d / 'runs' / 'base'}" in tau["command"]
    v = tau["reproduction"]["variants"]["tau0"]
    assert v["met"] is True and 0 <= v["top1"] <= 100 and "--set method.tau=0" in v["command"]
    # What the stage 2 adds to its stage 1 (the paper's: its top1 - its base), and the bar's gain over a variant.
    gain = round(tau["top1"] - base["top1"], 2)
    assert tau["reproduction"]["gain"] == {"over": "base", "ours": gain, "paper": 90.0}
    bar = tau["reproduction"]["bar"]
    assert bar["gain"] == round(tau["top1"] - v["top1"], 2) and bar["paper_gain"] == 100.0 and bar["met"] is True
    # Pruned: the kept stage 1 holds only its final weights; the stage 2 holds none.
    assert sorted(p.name for p in (d / "runs" / "base" / "checkpoints").iterdir()) == ["final.pt"]
    assert list((d / "runs" / "tau" / "checkpoints").iterdir()) == []
    assert not (d / "runs" / ".campaign.pid").exists()
    # The README table, between its markers, with ours beside the paper's.
    text = (d / "README.md").read_text()
    assert text.startswith("# x\n\nbefore\n") and text.endswith("\nafter\n") and "\nold\n" not in text
    assert f"| 1 | Tiny CE | {base['top1']:.1f} |" in text and "| a paper | met (+" in text
    assert f"**missed by {100 - tau['top1']:.1f}**; over base {gain:+.1f} (paper +90.0); gain over tau0 " \
           f"{bar['gain']:+.1f} (bar -100: met, paper +100.0)" in text and "| | tau 0 |" in text
    status = "\n".join(rp.Campaign(rp.load_table(d / "table.yaml"), d / "runs", d / "results", None).status_lines())
    assert "base" in status and "finished" in status and "2/2" in status and "MISSED" in status
    # Run again: nothing left to do.
    assert rp.main(args(d, "--parallel", "1")) == 0
    assert "started" not in capsys.readouterr().out
    # A written investigation in a record is pointed to from its table line.
    tau["investigation"] = {"summary": "why it misses"}
    (d / "results" / "repro_tau.json").write_text(json.dumps(tau))
    assert rp.main(args(d, "--readme")) == 0
    assert f"paper +100.0); investigated: `{d / 'results' / 'repro_tau.json'}` |" in (d / "README.md").read_text()


def run_until_then_sigint(d: Path, log: Path, line: str, after: str = "") -> str:
    """Start the runner as a subprocess (one row, --parallel 1), SIGINT it once the row's train.log shows
    ``line`` after the text ``after``, and return its output; it must exit 130 with its pid file gone."""
    runner = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "reproduce.py"), *args(d, "--parallel", "1")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def seen() -> bool:
        text = log.read_text() if log.is_file() else ""
        return after in text and line in text[text.rindex(after) if after else 0:]

    deadline = time.time() + 300
    while time.time() < deadline and runner.poll() is None and not seen():
        time.sleep(0.2)
    assert seen(), f"{line!r} not in {log} after {after!r}"
    assert (d / "runs" / ".campaign.pid").read_text().strip() == str(runner.pid)
    runner.send_signal(signal.SIGINT)
    out, _ = runner.communicate(timeout=120)
    assert runner.returncode == 130, out
    assert not (d / "runs" / ".campaign.pid").exists()
    return out


def test_sigint_checkpoints_and_the_next_run_resumes(campaign_dir, capsys, monkeypatch):
    d = campaign_dir
    rows = rows_for(d)[:1]
    rows[0]["recipe"] = str(d / "long.yaml")
    write_table(d, rows)
    log = d / "runs" / "base" / "train.log"
    out = run_until_then_sigint(d, log, f"epoch 2/{LONG}")
    assert "checkpointed, resumes next time" in out
    assert (d / "runs" / "base" / "checkpoints" / "last.pt").is_file()
    camp = rp.Campaign(rp.load_table(d / "table.yaml"), d / "runs", d / "results", None)
    row = camp.table.get("base")
    assert camp.state(row) == "partial"
    done, total = rp.progress(camp.run_dir(row))
    assert total == LONG and 2 <= done < LONG
    assert camp.command(row) == (["train", "--resume", "--out", str(d / "runs" / "base")], True)
    status = "\n".join(camp.status_lines())
    assert re.search(rf"base +unfinished +{done}/{LONG} .* s/epoch lately: about [\d.]+ h left", status), status
    # The next runner continues it: stopped once it has trained an epoch more, not after a fixed time, which a
    # loaded machine can spend on starting up alone.
    run_until_then_sigint(d, log, f"epoch {done + 1}/{LONG}", after="resuming")
    resumed = rp.progress(camp.run_dir(row))[0]
    assert resumed > done and camp.state(row) == "partial"
    # --hours stops it cleanly (checkpointed, exit 0) whenever the deadline falls, even before an epoch ends;
    # meanwhile the log says how far each row is (every second here) and, from the last process's epochs, its pace.
    monkeypatch.setattr(rp.Runner, "REPORT_EVERY", 0)
    assert rp.main(args(d, "--parallel", "1", "--hours", "0.004")) == 0
    out = capsys.readouterr().out
    assert "--hours reached" in out
    assert re.search(rf"progress: base \d+/{LONG} \(\d+ s/epoch lately: about [\d.]+ h left at that pace\)", out), out
    assert camp.state(row) == "partial" and rp.progress(camp.run_dir(row))[0] >= resumed
    # A row edited while its run is unfinished: resuming it would mix two settings.
    rows[0]["overrides"] = ["stages.0.optim.lr=0.2"]
    write_table(d, rows)
    camp = rp.Campaign(rp.load_table(d / "table.yaml"), d / "runs", d / "results", None)
    moved = r"started with other settings: stages\.0\.optim\.lr \(run: 0\.05, row: 0\.2\)"
    with pytest.raises(rp.TableError, match=moved):
        camp.command(camp.table.get("base"))


def test_an_optional_row_trains_only_when_named(campaign_dir, capsys):
    d = campaign_dir
    rows = rows_for(d)[:1] + [{"name": "extra", "title": "Tiny CE on other data", "recipe": str(d / "stage1.yaml"),
                               "seed": 1, "optional": "needs a download"}]
    write_table(d, rows)
    assert rp.main(args(d, "--parallel", "1")) == 0
    out = capsys.readouterr().out
    assert "campaign: 1 row(s)" in out and "finished base" in out and "started extra" not in out
    assert not (d / "runs" / "extra").exists()
    status = "\n".join(rp.Campaign(rp.load_table(d / "table.yaml"), d / "runs", d / "results", None).status_lines())
    assert "optional extra: needs a download (python benchmarks/reproduce.py --only extra)" in status
    text = (d / "README.md").read_text()
    assert "| optional, not run: needs a download |" in text and "1 of 1 runs finished" in text
    assert rp.main(args(d, "--only", "extra", "--parallel", "1")) == 0
    assert "finished extra" in capsys.readouterr().out and (d / "results" / "repro_extra.json").is_file()


def test_a_partial_run_saved_with_absolute_paths_matches_its_row(campaign_dir, monkeypatch):
    """A run saves data.root absolute; its row names it relative to the repository: the same file, no change."""
    import os

    from longtail.config import absolute_paths, to_dict
    from longtail.engine.build import load_config

    d = campaign_dir
    recipe = tiny_recipe(Path(os.path.relpath(d / "folder", REPO)))
    (d / "relative.yaml").write_text(yaml.safe_dump(recipe))
    write_table(d, [{"name": "rel", "recipe": str(d / "relative.yaml"), "seed": 0}])
    camp = rp.Campaign(rp.load_table(d / "table.yaml"), d / "runs", d / "results", None, log=lambda m: None)
    row = camp.table.get("rel")
    monkeypatch.chdir(REPO)  # where the runner starts its trainings
    cfg = load_config(str(d / "relative.yaml"), [f"seed={row.seed}"])
    absolute_paths(cfg)
    saved = to_dict(cfg)
    assert saved["data"]["root"] != recipe["data"]["root"] and os.path.isabs(saved["data"]["root"])
    (d / "runs" / "rel").mkdir(parents=True)
    (d / "runs" / "rel" / "config.yaml").write_text(yaml.safe_dump(saved))
    assert camp.check_config(row) == []  # no error: the same folder
    (d / "elsewhere").mkdir()
    saved["data"]["root"] = str(d / "elsewhere")
    (d / "runs" / "rel" / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(rp.TableError, match="started with other settings: data.root"):
        camp.check_config(row)
    # Committed on a machine whose checkout sat elsewhere: its data.root is not here, the row's is. Resumed with
    # the row's location (`longtail train --resume` takes file locations).
    saved["data"]["root"] = "/home/someone/longtail/../shared/folder"
    (d / "runs" / "rel" / "config.yaml").write_text(yaml.safe_dump(saved))
    located = [f"data.root={recipe['data']['root']}"]
    assert camp.check_config(row) == located
    assert camp.command(row) == (["train", "--resume", "--out", str(d / "runs" / "rel"), *located], True)


def test_a_partial_run_from_older_code_matches_its_row_without_notes(campaign_dir, monkeypatch):
    """A run started before an option existed resumes with its default, as the row would start: no change, no
    note. A value the row changes is still one."""
    from longtail.config import absolute_paths, to_dict
    from longtail.engine.build import load_config

    d = campaign_dir
    write_table(d, [{"name": "old", "recipe": str(d / "stage1.yaml"), "seed": 0}])
    notes = []
    camp = rp.Campaign(rp.load_table(d / "table.yaml"), d / "runs", d / "results", None, log=notes.append)
    row = camp.table.get("old")
    monkeypatch.chdir(REPO)
    cfg = load_config(str(d / "stage1.yaml"), ["seed=0"])
    absolute_paths(cfg)
    saved = to_dict(cfg)
    del saved["sync_every"], saved["stages"][0]["ema"], saved["data"]["decode_check"]  # options of later code
    (d / "runs" / "old").mkdir(parents=True)
    (d / "runs" / "old" / "config.yaml").write_text(yaml.safe_dump(saved))
    assert camp.check_config(row) == [] and notes == []
    saved["stages"][0]["epochs"] = 7
    (d / "runs" / "old" / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(rp.TableError, match=r"stages\.0\.epochs \(run: 7, row: 2\)"):
        camp.check_config(row)


def test_logged_seconds_sum_every_process_of_a_resumed_run():
    log = ("2026-12-01 10:00:00,000 INFO run r: x\n"
           "2026-12-01 10:10:00,500 INFO stage main epoch 1/2 loss 1 lr 0.1 10 img/s\n"
           "  a continuation line without a time\n"
           "2026-12-01 11:00:00,000 INFO resuming r from its last checkpoint\n"  # an hour without a process
           "2026-12-01 11:00:01,000 INFO run r: x\n"
           "2026-12-01 11:05:00,000 INFO finished in 299 s\n")
    assert rp.logged_seconds(log) == 600.5 + 300.0
    assert rp.logged_seconds("no times here\n") is None


def test_pace_is_the_recent_epoch_time_of_one_process():
    def epoch(t: str, n: int) -> str:
        return f"2026-12-01 {t},000 INFO stage main epoch {n}/100 loss 1 lr 0.1 10 img/s\n"

    first = epoch("10:00:00", 1) + epoch("10:01:00", 2) + epoch("10:02:00", 3)  # 60 s per epoch
    assert rp.pace(first) == 60.0
    # A resume on a slower machine: the gap across it (start-up, a part epoch) is not an epoch's time.
    later = first + "2026-12-01 12:00:00,000 INFO resuming r from its last checkpoint\n" + epoch("12:00:30", 4)
    assert rp.pace(later) == 60.0  # the new process has one epoch line, no gap yet: the last one's pace
    later += epoch("12:02:30", 5)
    assert rp.pace(later) == 120.0  # its first gap: the new machine's pace, not mixed with the old one's
    later += epoch("12:04:30", 6) + epoch("12:06:30", 7) + epoch("12:09:30", 8)
    assert rp.pace(later) == 120.0  # its gaps 120, 120, 120, 180
    later += epoch("12:12:30", 9) + epoch("12:15:30", 10)
    assert rp.pace(later) == 180.0  # the last five: 120, 120, 180, 180, 180
    assert rp.pace(epoch("10:00:00", 1)) is None and rp.pace("no times here\n") is None


def test_table_shows_mean_and_spread_over_three_seeds(tmp_path):
    rows = [{"name": "a", "title": "A", "recipe": "x", "paper": {"top1": 80.0, "source": "p"}},
            {"name": "a_s1", "recipe": "x", "seed": 1, "seeds_of": "a"},
            {"name": "a_s2", "recipe": "x", "seed": 2, "seeds_of": "a"}]
    camp = rp.Campaign(rp.load_table(write_table(tmp_path, rows)), tmp_path / "runs", tmp_path, None)
    for name, top1 in (("a", 79.0), ("a_s1", 80.0)):
        (tmp_path / f"repro_{name}.json").write_text(json.dumps(
            {"top1": top1, "many": 1.0, "medium": 2.0, "few": 3.0,
             "reproduction": {"met": True, "diff": top1 - 80, "variants": {}}}))
    assert "| 1 | A | 79.0 |" in camp.table_markdown()  # two seeds: seed 0's value, no spread yet
    (tmp_path / "repro_a_s2.json").write_text(json.dumps(
        {"top1": 81.0, "many": 1.0, "medium": 2.0, "few": 3.0, "reproduction": {"met": True, "diff": 1.0,
                                                                              "variants": {}}}))
    assert "| 1 | A | 80.0 ± 1.0 (3 seeds) |" in camp.table_markdown()


def test_a_control_sits_under_its_row_unnumbered_so_the_rows_keep_their_numbers(tmp_path):
    rows = [{"name": "a", "title": "A", "recipe": "x"},
            {"name": "b", "title": "B", "recipe": "x", "variants": [{"name": "v", "title": "B's variant",
                                                                       "set": ["method.alpha=0"]}]},
            {"name": "c", "title": "C", "recipe": "x"},
            {"name": "b_control", "title": "B's control", "recipe": "x", "control_of": "b"}]
    camp = rp.Campaign(rp.load_table(write_table(tmp_path, rows)), tmp_path / "runs", tmp_path, None)
    body = [ln.split(" | ")[:2] for ln in camp.table_markdown().splitlines()[2:] if ln.startswith("|")]
    assert body == [["| 1", "A"], ["| 2", "B"], ["|", "B's variant"], ["|", "B's control"], ["| 3", "C"]]
    bad = rows + [{"name": "d", "recipe": "x", "control_of": "b_control"}]
    with pytest.raises(rp.TableError, match="control_of: 'b_control' must name a row of its own"):
        rp.load_table(write_table(tmp_path, bad))
    with pytest.raises(rp.TableError, match="control_of: 'zz' must name an earlier row"):
        rp.load_table(write_table(tmp_path, rows[:1] + [{"name": "d", "recipe": "x", "control_of": "zz"}]))


def test_a_resumed_row_keeps_its_thread_count(campaign_dir):
    """Another CPU thread count rounds differently: a row resumes with the count it trained with (runs/ROW.threads),
    unless --threads says otherwise; a fresh run takes the campaign's count."""
    d = campaign_dir
    write_table(d, rows_for(d)[:1])
    camp = rp.Campaign(rp.load_table(d / "table.yaml"), d / "runs", d / "results", None)
    row = camp.table.get("base")
    assert camp.row_threads(row, 1, explicit=False, resumed=True) == (1, None)  # no file yet: the default
    camp.runs.mkdir(parents=True)
    camp.threads_path(row).write_text("2\n")
    assert camp.row_threads(row, 1, explicit=False, resumed=False) == (1, None)  # a fresh run: the default
    threads, note = camp.row_threads(row, 1, explicit=False, resumed=True)
    assert threads == 2 and "keeps the 2 thread(s)" in note
    threads, note = camp.row_threads(row, 1, explicit=True, resumed=True)
    assert threads == 1 and "not bit-exact" in note
    assert camp.row_threads(row, 2, explicit=True, resumed=True) == (2, None)


def test_a_campaign_s_own_outputs_do_not_make_the_recorded_commit_dirty(tmp_path):
    from longtail.utils import git_commit

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    for rel in ("src/pkg/a.py", "benchmarks/reproduce.yaml", "benchmarks/runs/r/train.log",
                "benchmarks/results/r.json", "README.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("0\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "x")
    where = tmp_path / "src" / "pkg"  # as the package's own folder, below the top
    clean = git_commit(where)
    assert re.fullmatch(r"[0-9a-f]{40}", clean)
    (tmp_path / "benchmarks/runs/r/train.log").write_text("epoch 1\n")  # what a training row writes
    (tmp_path / "benchmarks/results/r.json").write_text("{}\n")
    (tmp_path / "README.md").write_text("the results table, regenerated\n")
    (tmp_path / "untracked.txt").write_text("x\n")
    assert git_commit(where) == clean
    for rel in ("src/pkg/a.py", "benchmarks/reproduce.yaml"):  # code or the table's rows changed: dirty
        (tmp_path / rel).write_text("1\n")
        assert git_commit(where) == clean + "+dirty"
        git("checkout", "-q", "--", rel)
    assert git_commit(tmp_path / "benchmarks") == clean
