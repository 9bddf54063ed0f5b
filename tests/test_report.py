"""`attnbench report`: one self-contained page from the committed results, opened in a real headless
browser (Debian's ``chromium``; `.ci/run` installs it): every image loads, no console or script
error, the tables sort, the page is not blank. Also its Markdown twin, the comparison with a saved
run, seeds against repeats, and that it writes nothing into the folders it reports on."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from attnbench.cli import main
from attnbench.report.page import Table, Text, build, render_html, seed_table
from attnbench.results.discover import discover
from tests.test_plots import committed_results

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (`apt-get install -y chromium`; .ci/run installs it)")
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
                           *args], capture_output=True, text=True, timeout=180)


def snapshot(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The report of the committed results, as `attnbench report` writes it."""
    committed = committed_results()
    before = snapshot(committed)
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert main(["report", str(committed), "--out", str(out)]) == 0
    assert snapshot(committed) == before  # nothing written into the folders reported on
    return out


def test_the_page_holds_every_part_and_needs_no_network(page):
    text = page.read_text()
    for anchor in ("verdict", "verdict-accuracy", "verdict-kernel", "contexts", "sweeps", "accuracy", "tasks",
                   "probes"):
        assert f'id="{anchor}"' in text
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', text)  # nothing fetched
    assert "<link" not in text and "@import" not in text
    images = re.findall(r'<img [^>]*src="data:image/png;base64,', text)
    assert len(images) >= 9  # the sweep's three, each task's, each probe's
    for needle in ("AMD EPYC", "threads", "float32", "torch", "time_exponent", "Resolution probe",
                   "seeds (n)", "± ", "(n = 3)", "Breaking lengths", "Accuracy against length",
                   "accuracy-mqar-cpu", "accuracy-listops-cpu"):
        assert needle in text, needle


def test_the_page_renders_in_a_headless_browser(page, tmp_path):
    result = chromium(tmp_path, "--dump-dom", page.as_uri() + "#selftest")
    assert result.returncode == 0, result.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", result.stdout)
    assert body, result.stdout[:500]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))
    images = len(re.findall(r"<img ", page.read_text()))
    assert attrs.get("data-ready") == "ok", attrs
    counts = (attrs["data-images"], attrs["data-broken-images"], attrs["data-errors"])
    assert counts == (str(images), "0", "0")
    assert attrs.get("data-sorted") == "ok"  # a numeric column sorted both ways by the page's own script
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console


def test_the_rendered_page_is_not_blank(page, tmp_path):
    import matplotlib.image

    shot = tmp_path / "report.png"
    result = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri())
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels[..., :3].std() > 0.05  # text, tables and a plot, not one colour
    dark = (pixels[..., :3].mean(axis=2) < 0.5).mean()
    assert 0.005 < dark < 0.6


SCREEN = (1400, 900)  # the first screen of a laptop-sized window
# Appended to a copy of the page for the test alone: where the browser laid out each verdict table.
BOXES = """<script>window.addEventListener('load', function () {
  var boxes = Array.prototype.map.call(document.querySelectorAll('section[id^=verdict] table'), function (t) {
    var r = t.getBoundingClientRect();
    return [r.left, r.top, r.right, r.bottom].map(Math.round).join(',');
  });
  document.body.setAttribute('data-verdict-boxes', boxes.join(';'));
});</script>"""


def test_the_first_screen_shows_every_verdict_table(page, tmp_path):
    """In a 1400×900 window the browser lays every verdict table (one per accuracy and kernel sweep)
    out on the first screen, and the screenshot of that screen shows them: text in each box."""
    import matplotlib.image

    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", BOXES + "</body>"))
    size = f"--window-size={SCREEN[0]},{SCREEN[1]}"
    result = chromium(tmp_path, "--dump-dom", size, probe.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    found = re.search(r'data-verdict-boxes="([^"]*)"', result.stdout)
    assert found, result.stdout[:500]
    boxes = [tuple(map(int, box.split(","))) for box in found.group(1).split(";") if box]
    found = discover([committed_results()])
    assert len(boxes) == len(found.accuracy) + len(found.sweeps) >= 2  # a table per sweep, both kinds
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= SCREEN[0] and 0 < top < bottom <= SCREEN[1], (left, top, right, bottom)
    shot = tmp_path / "first-screen.png"
    result = chromium(tmp_path, f"--screenshot={shot}", size, page.as_uri())
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    grey = matplotlib.image.imread(shot)[..., :3].mean(axis=2)
    assert grey.shape == (SCREEN[1], SCREEN[0])
    for left, top, right, bottom in boxes:
        ink = (grey[top:bottom, left:right] < 0.5).mean()
        assert 0.02 < ink < 0.5, ((left, top, right, bottom), ink)  # a table's text, not blank, not a blot


def test_markdown_is_the_same_report_with_its_plots_beside_it(tmp_path):
    out = tmp_path / "report.md"
    assert main(["report", str(committed_results()), "--out", str(out)]) == 0
    text = out.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) >= 9 and all((out.parent / link).is_file() for link in links)
    titles = ["## Verdict", "### Accuracy sweeps: the fronts at each n and the breaking lengths",
              "### Kernel sweeps: how time grows with n and where each overtakes the baselines",
              "## Kernel sweeps", "## Accuracy sweeps", "## Tasks", "## Resolution probes", "## Run contexts"]
    lines = text.splitlines()
    at = [lines.index(t) for t in titles]
    assert at == sorted(at)  # the verdict first, the run contexts last
    assert re.search(r"^\| mechanism \|", text, re.M) and "|---" in text


def test_compare_with_a_saved_run(tmp_path):
    committed = committed_results()
    saved = tmp_path / "saved"
    sweep = next(committed.rglob("scale.csv")).parent
    shutil.copytree(sweep, saved / sweep.name)
    table = pd.read_csv(committed / "imagenet.csv")
    table["top1"] -= 1.0
    table.to_csv(saved / "imagenet.csv", index=False)
    out = tmp_path / "r.html"
    assert main(["report", str(committed), "--compare", str(saved), "--out", str(out)]) == 0
    text = out.read_text()
    assert 'id="compare"' in text and "0 regressions" in text
    assert "Δ top1" in text and ">1</td>" in text  # this mean minus the saved one: +1 point


def test_accuracy_sweeps_are_shown_when_present(tmp_path):
    folder = tmp_path / "accuracy-run"
    folder.mkdir()
    pd.DataFrame({"mechanism": ["set", "softmax"], "n": [1024, 1024], "accuracy": [0.9, 0.8]}).to_csv(
        folder / "accuracy.csv", index=False)
    pd.DataFrame({"mechanism": ["set", "softmax"], "breaking_n": [8192, 2048]}).to_csv(
        folder / "breaking.csv", index=False)
    text = render_html(build([tmp_path]))
    assert "Accuracy sweep:" in text and "breaking_n" in text and "8192" in text


def test_the_report_counts_seeds_not_repeats():
    rows = pd.DataFrame([{"task": "imagenet", "mechanism": "set", "dataset": "d", "epochs": 8, "seed": s,
                          "top1": v, "status": "ok"} for s, v in ((0, 90.0), (1, 92.0), (0, 94.0))])
    shown, _ = seed_table(rows, ["top1"])
    row = shown.iloc[0]
    assert (row["seeds (n)"], row["repeats"]) == (2, 1)
    assert row["top1"] == "93.0 ± 1.4 (n = 2)"  # seed 0's latest run (94) and seed 1 (92)


def test_no_results_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")])
    assert exc.value.code == 2
    assert "no results in" in capsys.readouterr().err


def two_variant_sweep(folder: Path) -> Path:
    """A kernel sweep of softmax and SeT at two m (``--opt set.m=16,64``): scale.csv and rounds.csv."""
    folder.mkdir()
    times = {"softmax": 1.0, "set[m=16]": 2.0, "set[m=64]": 4.0}  # ms at n = 1024, each ∝ n
    scale, rounds = [], []
    for variant, ms in times.items():
        mechanism = variant.split("[")[0]
        for n in (1024, 2048, 4096):
            t = ms * n / 1024
            scale.append({"mechanism": mechanism, "variant": variant, "n": n, "mode": "fwd", "status": "ok",
                          "time_ms_median": t, "peak_mem_mib": t, "options": "{}", "message": ""})
            rounds += [{"mechanism": mechanism, "variant": variant, "n": n, "mode": "fwd", "pass": p,
                        "attempt": 0, "round": p, "time_ms_median": t, "runs": 8, "machine_gflops": 400.0,
                        "machine_gbs": 50.0, "slowdown": 1.0, "disturbed": False, "kept": True}
                       for p in range(3)]
    pd.DataFrame(scale).to_csv(folder / "scale.csv", index=False)
    pd.DataFrame(rounds).to_csv(folder / "rounds.csv", index=False)
    return folder


def test_each_variant_of_a_sweep_is_its_own_series(tmp_path):
    two_variant_sweep(tmp_path / "scale-variants")
    report = build([tmp_path])
    sweep = next(s for s in report.sections if s.title.startswith("Kernel sweep:"))
    tables = [b.frame for b in sweep.blocks if isinstance(b, Table)]
    fits = next(t for t in tables if "time_exponent" in t.columns)
    assert sorted(fits["mechanism"]) == ["set[m=16]", "set[m=64]", "softmax"]
    assert set(fits["time_exponent"]) == {"1.00"}
    same_rounds = next(t for t in tables if 1024 in t.columns)  # time against softmax, per n
    assert same_rounds.set_index("mechanism")[1024].to_dict() == {"set[m=16]": "2x [2, 2]",
                                                                 "set[m=64]": "4x [4, 4]"}
    assert any(isinstance(b, Text) and b.text.startswith("3 mechanisms") for b in sweep.blocks)
