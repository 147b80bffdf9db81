"""
Tests that the documentation still describes the code: every line link in README.md and docs/*.md
lands on the definition it names, every test the docs name exists, the README's snippet runs,
every train_cifar.py command in the docs parses, the docs cite the paper and the code, not a
tracker, and `pip install .` gives `import cwrgp` (pyproject.toml).

Line links are written [`name`](path.py#L123), path relative to the Markdown file; name is a
top-level function, class or assignment, or Class.method. When code moves, fix them all at once:

    python test_docs.py --update
"""

import ast
import os
import pathlib
import re
import shlex
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[`(?P<name>[\w.]+)`\]\((?P<path>[\w./-]+\.py)#L(?P<line>\d+)\)")


def definitions(path):
    """{name: line} for the top-level functions, classes and assignments of a Python file, and
    Class.method for methods."""
    found = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = node.lineno  # the def/class line, below any decorator
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef):
                        found[f"{node.name}.{item.name}"] = item.lineno
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    found[target.id] = node.lineno
    return found


def line_links():
    """(page, line of the page, name, target file, line number) for every line link in the docs."""
    for page in PAGES:
        for number, text in enumerate(page.read_text().splitlines(), 1):
            for link in LINK.finditer(text):
                target = (page.parent / link["path"]).resolve()
                yield page, number, link["name"], target, int(link["line"])


def stale_links():
    """[(page, page line, name, target, written line, line now or None)] for links that miss."""
    cache, stale = {}, []
    for page, number, name, target, line in line_links():
        if target not in cache:
            cache[target] = definitions(target) if target.exists() else {}
        now = cache[target].get(name)
        if now != line:
            stale.append((page, number, name, target, line, now))
    return stale


def test_line_links_point_at_the_definitions_they_name():
    links = list(line_links())
    assert len(links) >= 20, "the paper-to-code map lost its line links"
    stale = stale_links()
    report = [
        f"{page.relative_to(ROOT)}:{number}: {name} is written as "
        f"{target.relative_to(ROOT)}#L{line}, "
        + (f"now defined at line {now}" if now else "but no such definition exists")
        for page, number, name, target, line, now in stale
    ]
    assert not stale, (
        "stale line links (run `python test_docs.py --update` to fix moved ones):\n"
        + "\n".join(report))


def update():
    """Rewrite every line link whose definition moved; report the ones whose name is gone."""
    fixes = {}
    for page, number, name, target, line, now in stale_links():
        if now is None:
            print(f"{page.relative_to(ROOT)}:{number}: {name} not found in "
                  f"{target.relative_to(ROOT)}: fix by hand")
        else:
            fixes.setdefault(page, {})[(number, name)] = now
    for page, moved in fixes.items():
        lines = page.read_text().split("\n")
        for (number, name), now in moved.items():
            lines[number - 1] = re.sub(
                rf"(\[`{re.escape(name)}`\]\([\w./-]+\.py#L)\d+\)", rf"\g<1>{now})",
                lines[number - 1])
        page.write_text("\n".join(lines))
        print(f"{page.relative_to(ROOT)}: {len(moved)} line links updated")


def test_every_test_the_docs_name_exists():
    tests = set()
    for path in ROOT.glob("test_*.py"):
        tests |= {name for name in definitions(path) if name.startswith("test_")}
    named = [(page, name) for page in PAGES
             for name in re.findall(r"`(test_\w+)`", page.read_text())]
    assert named
    missing = sorted({f"{page.relative_to(ROOT)}: {name}"
                      for page, name in named if name not in tests})
    assert not missing, "docs name tests that do not exist:\n" + "\n".join(missing)


def test_readme_snippet_runs_and_prints_what_it_computes(capsys):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    snippet = next(block for block in blocks if "cw_rgp_loss" in block)
    torch.manual_seed(0)
    # Stand-ins for the reader's network: any encoder, a 512-d projector for CW-RGP and a 64-d one
    # for W-MSE.
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 256),
                                  torch.nn.ReLU())
    names = {"encoder": encoder, "projector": torch.nn.Linear(256, 512),
             "projector_64": torch.nn.Linear(256, 64),
             "view1": torch.rand(256, 3, 8, 8), "view2": torch.rand(256, 3, 8, 8)}
    exec(compile(snippet, "README.md", "exec"), names)
    printed = capsys.readouterr().out
    assert printed.strip(), "the snippet's last lines should print what they compute"
    assert all(re.search(r"\d", line) for line in printed.strip().splitlines())


def test_module_docstring_loss_in_plain_torch_equals_cw_rgp_loss():
    """cwrgp.py opens with the CW-RGP loss in ten lines of plain torch, a doctest that checks it
    equals cw_rgp_loss on a fixed input and partition; every example in the module must pass."""
    import doctest

    import cwrgp

    failed, attempted = doctest.testmod(cwrgp)
    assert attempted > 0, "cwrgp.py's docstring lost its example"
    assert failed == 0, "cwrgp.py's docstring example fails (the doctest report is above)"


def test_readme_api_table_has_the_real_signatures():
    import inspect

    import cwrgp

    rows = re.findall(r"^\| `((\w+)\(.*?\))` \|", (ROOT / "README.md").read_text(), re.M)
    assert len(rows) >= 9
    for written, name in rows:
        actual = name + str(inspect.signature(getattr(cwrgp, name))).replace("'", '"')
        assert written == actual, f"README.md's API table: {written} but cwrgp has {actual}"


def trainer_commands():
    """Every `python train_cifar.py ...` command in the docs, with shell variables set earlier in
    the same code block expanded, as (page, argv)."""
    for page in PAGES:
        text = page.read_text()
        for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
            variables = {}
            for line in block.replace("\\\n", " ").splitlines():
                assignment = re.match(r'\s*([A-Z_]+)="([^"]*)"\s*$', line)
                if assignment:
                    variables[assignment[1]] = assignment[2]
                yield from commands_in(page, line, variables)
        for span in re.findall(r"`([^`]*python train_cifar\.py[^`]*)`",
                               re.sub(r"```.*?```", "", text, flags=re.S)):
            yield from commands_in(page, span.replace("\n", " "), {})


def commands_in(page, text, variables):
    for part in re.split(r";|&&|\|\|", text.split(" #")[0]):
        if "train_cifar.py" not in part:
            continue
        for name, value in variables.items():
            part = part.replace(f"${name}", value)
        argv = shlex.split(part)
        yield page, argv[argv.index("train_cifar.py") + 1:]


def test_trainer_commands_in_the_docs_parse():
    import train_cifar

    commands = list(trainer_commands())
    assert len(commands) >= 15, "expected the recipe table and the results' commands"
    bad = []
    for page, argv in commands:
        try:
            train_cifar.build_parser().parse_args(argv)
        except SystemExit as stop:  # --help exits with 0 after printing the flags
            if stop.code:
                bad.append(f"{page.relative_to(ROOT)}: python train_cifar.py {shlex.join(argv)}")
    assert not bad, "commands in the docs that train_cifar.py refuses:\n" + "\n".join(bad)


def test_readme_and_results_stay_short():
    """A README that fits a screen or two, and a results page that reads as a document."""
    for name, most in (("README.md", 150), ("docs/results.md", 400)):
        lines = len((ROOT / name).read_text().splitlines())
        assert lines <= most, f"{name} has {lines} lines; at most {most}"


def python_files():
    """The project's Python files: those at its root and in docs/."""
    return [*sorted(ROOT.glob("*.py")), *sorted((ROOT / "docs").glob("*.py"))]


def test_every_python_line_fits_in_100_columns():
    long = [f"{path.relative_to(ROOT)}:{number}: {len(line)} characters"
            for path in python_files()
            for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1)
            if len(line) > 100]
    assert not long, "lines over 100 columns:\n" + "\n".join(long)


def test_training_page_commands_are_checked():
    """docs/training.md's commands are among those test_trainer_commands_in_the_docs_parse
    parses."""
    page = ROOT / "docs" / "training.md"
    assert sum(1 for where, _ in trainer_commands() if where == page) >= 5


def test_docs_name_no_placeholder_address():
    placeholders = [f"{page.relative_to(ROOT)}:{number}: {line.strip()}"
                    for page in [*PAGES, ROOT / "pyproject.toml", ROOT / "requirements.txt"]
                    for number, line in enumerate(page.read_text().splitlines(), 1)
                    if re.search(r"<this repository|git\+<|URL>", line)]
    assert not placeholders, "placeholder addresses in the docs:\n" + "\n".join(placeholders)


def test_docs_cite_the_paper_and_the_code_not_a_tracker():
    cited = [f"{page.relative_to(ROOT)}:{number}: {line.strip()}"
             for page in PAGES for number, line in enumerate(page.read_text().splitlines(), 1)
             if re.search(r"\bissues?\b|\bclaim \d", line, re.I)]
    assert not cited, "the docs point at something a reader cannot see:\n" + "\n".join(cited)


def load_figures():
    import importlib.util

    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("figures", ROOT / "docs" / "figures.py")
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    return figures


def test_figure_redraws_are_byte_identical(tmp_path):
    figures = load_figures()
    runs = [figures.load_run(figures.LOGS / f"spectrum-{m}.jsonl",
                             figures.LOGS / f"spectrum-{m}.config.json", m)
            for m in ("wmse", "cwrgp")]
    for attempt in ("a", "b"):
        figures.training_figure(runs, tmp_path / f"training-{attempt}.png", "t")
        figures.spectrum_figure(runs, tmp_path / f"spectrum-{attempt}.png", "t")
        figures.whitening_figure(tmp_path / f"whitening-{attempt}.png")
    for name in ("training", "spectrum", "whitening"):
        assert ((tmp_path / f"{name}-a.png").read_bytes()
                == (tmp_path / f"{name}-b.png").read_bytes()), name


def test_figure_legends_tell_runs_of_one_config_apart():
    figures = load_figures()
    same = [figures.load_run(figures.LOGS / "fmnist-cwrgp.jsonl",
                             figures.LOGS / "fmnist-cwrgp.config.json", name)
            for name in ("runs/a", "runs/b")]
    other = figures.load_run(figures.LOGS / "fmnist-wmse.jsonl",
                             figures.LOGS / "fmnist-wmse.config.json", "runs/c")
    labels = figures.labels([*same, other])
    assert labels[:2] == ["runs/a", "runs/b"]
    assert labels[2].startswith("W-MSE")


def kept_run_as_directory(figures, name, directory):
    """A run directory, as the trainer writes one, holding the kept log docs/logs/<name>.*."""
    directory.mkdir()
    (directory / "log.jsonl").write_bytes((figures.LOGS / f"{name}.jsonl").read_bytes())
    (directory / "config.json").write_bytes((figures.LOGS / f"{name}.config.json").read_bytes())
    return str(directory)


def test_figures_command_line_writes_where_it_is_told(tmp_path, monkeypatch, capsys):
    """docs/figures.py: --help is help, no arguments is an error that rewrites nothing, several
    runs go to --out or the current directory (never into a run's folder), one run into its own."""
    figures = load_figures()
    with pytest.raises(SystemExit) as stopped:
        figures.main(["--help"])
    assert stopped.value.code == 0 and "--docs" in capsys.readouterr().out
    tracked = {path: path.stat().st_mtime_ns for path in figures.DOCS.glob("*.png")}
    for argv in ([], ["--docs", "runs/a"]):
        with pytest.raises(SystemExit) as stopped:
            figures.main(argv)
        assert stopped.value.code == 2 and "usage:" in capsys.readouterr().err
    assert {path: path.stat().st_mtime_ns for path in figures.DOCS.glob("*.png")} == tracked
    runs = [kept_run_as_directory(figures, f"spectrum-{name}", tmp_path / name)
            for name in ("wmse", "cwrgp")]
    drawn = {"training.png", "spectrum.png"}
    figures.main([*runs, "--out", str(tmp_path / "compared")])
    monkeypatch.chdir(tmp_path)
    figures.main(runs)
    for folder in ("compared", "."):
        assert {path.name for path in (tmp_path / folder).glob("*.png")} == drawn
    for run in runs:
        assert not list(pathlib.Path(run).glob("*.png")), "several runs were drawn into one of them"
    figures.main(runs[:1])
    assert {path.name for path in (tmp_path / "wmse").glob("*.png")} == drawn


def test_figures_stable_rank_axis_is_linear_over_a_small_range():
    figures = load_figures()
    assert figures.rank_scale([0.5, 0.55, 0.6]) == "linear"  # a short run: log would look flat
    assert figures.rank_scale([0.002, 0.05]) == "log"
    assert figures.rank_scale([]) == figures.rank_scale([0.0, 0.5]) == "linear"


def brute_force_knn(bank, bank_y, query, query_y, k):
    """k-NN majority vote by explicit distances (ties to the lowest class)."""
    nearest = torch.cdist(query.double(), bank.double()).topk(k, dim=1, largest=False).indices
    votes = torch.stack([torch.bincount(row, minlength=int(bank_y.max()) + 1)
                         for row in bank_y[nearest]])
    return (votes.argmax(1) == query_y).double().mean().item()


def test_representations_measures_pixels_and_a_run_as_the_trainer_does(tmp_path):
    """docs/representations.py: the raw-pixel 5-NN and L2-normalised 5-NN equal a brute-force
    distance computation; the encoder's 5-NN, L2 5-NN and 200-NN equal the trainer's own last-epoch
    scores for the same checkpoint; embedding and whitened output are measured at their widths."""
    import importlib.util
    import train_cifar
    import torch.nn.functional as F

    out = tmp_path / "run"
    log = train_cifar.main(["--dataset", "fake", "--limit", "384", "--arch", "convnet",
                            "--width", "16", "--batch-size", "128", "--epochs", "1",
                            "--probe-epochs", "0", "--out", str(out)])["log"]
    spec = importlib.util.spec_from_file_location("representations",
                                                  ROOT / "docs" / "representations.py")
    representations = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(representations)
    rows = {name: (dim, s)
            for name, dim, s in representations.main([str(out), "--probe-epochs", "2"])}
    assert list(rows) == ["raw pixels", "encoder", "embedding", "whitened"]
    assert [rows[n][0] for n in rows] == [3 * 32 * 32, 64, 512, 512]
    args = train_cifar.resolve_config(["--dataset", "fake", "--limit", "384"])
    _, (train_x, train_y, test_x, test_y), _ = train_cifar.load_data(args, torch.device("cpu"))
    px, qx = train_x.flatten(1).float() / 255, test_x.flatten(1).float() / 255
    assert rows["raw pixels"][1]["knn5"] == pytest.approx(
        brute_force_knn(px, train_y, qx, test_y, 5), abs=1e-12)
    l2 = brute_force_knn(F.normalize(px, dim=1), train_y, F.normalize(qx, dim=1), test_y, 5)
    assert rows["raw pixels"][1]["knn5_l2"] == pytest.approx(l2, abs=1e-12)
    trainer = {"knn5": "knn5_top1", "knn5_l2": "knn5_l2_top1", "knn200": "knn_top1"}
    assert ({m: rows["encoder"][1][m] for m in trainer}
            == {m: log[-1][key] for m, key in trainer.items()})
    assert all(0 <= rows[n][1]["linear"] <= 1 for n in rows)


def headings(page):
    """The anchors GitHub gives a Markdown page's headings: lower case, punctuation dropped, spaces
    as hyphens."""
    return {re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
            for title in re.findall(r"^#+ (.*)$", page.read_text(), re.M)}


def test_section_links_land_on_headings():
    """Every [text](page.md#anchor) and [text](#anchor) in the docs names a heading of that page."""
    missing = [f"{page.relative_to(ROOT)}: {target}#{anchor}"
               for page in PAGES
               for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", page.read_text())
               if not target.endswith(".py")
               and anchor not in headings(page.parent / target if target else page)]
    assert not missing, "links to sections that do not exist:\n" + "\n".join(missing)


def test_pip_install_gives_import_cwrgp_anywhere(tmp_path):
    """pyproject.toml builds a wheel holding cwrgp.py alone, and installed, `import cwrgp` works
    outside the repository (the README's `pip install .`). Built offline from a copy of the two
    files it needs."""
    import subprocess
    import zipfile

    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "cwrgp.py", "README.md"):
        (source / name).write_bytes((ROOT / name).read_bytes())
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
                    source], check=True)
    (wheel,) = (tmp_path / "dist").glob("cwrgp-*.whl")
    assert {name for name in zipfile.ZipFile(wheel).namelist()
            if ".dist-info/" not in name} == {"cwrgp.py"}
    subprocess.run([*pip, "install", "--no-deps", "--target", tmp_path / "site", wheel], check=True)
    printed = subprocess.run([sys.executable, "-c",
                              "import cwrgp; print(cwrgp.__file__, cwrgp.CWRGPLoss())"],
                             cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
                             capture_output=True, text=True, check=True).stdout
    assert printed.startswith(str(tmp_path / "site" / "cwrgp.py")) and "sub_batch=64" in printed


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_lead_to_files(page):
    missing = [target for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", page.read_text())
               if not (page.parent / target).exists()]
    assert not missing, f"{page.name} links to files that do not exist: {missing}"


if __name__ == "__main__":
    if sys.argv[1:] == ["--update"]:
        update()
    else:
        print(__doc__)
