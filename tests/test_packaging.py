"""What a pip-installed mgcl relies on beyond the code: `mgcl --version`, the
shipped configs found by name (`mgcl run NAME`), and the README rewritten into
a package description without relative links (scripts/pypi_readme.py). The
wheels themselves are built and checked by scripts/build_wheels.sh and
scripts/smoke_test.sh (run by .ci/run)."""
import importlib.util
import os
from pathlib import Path

import pytest
from mgcl import __version__, cli
from mgcl.mgtil import configs, run

ROOT = Path(__file__).resolve().parent.parent
CONFIG_FILES = sorted((ROOT / "configs").glob("*.yaml"))


def _pypi_readme():
    spec = importlib.util.spec_from_file_location("pypi_readme", ROOT / "scripts" / "pypi_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"mgcl {__version__}"


def test_shipped_configs_are_the_config_files():
    assert CONFIG_FILES, "no configs/*.yaml in the checkout"
    found = configs.shipped()
    assert sorted(found) == [p.stem for p in CONFIG_FILES]
    for p in CONFIG_FILES:
        assert Path(found[p.stem]).read_bytes() == p.read_bytes()


@pytest.mark.parametrize("spelling", ["{}", "{}.yaml", "configs/{}.yaml"])
def test_resolve_a_shipped_name_from_anywhere(spelling, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                      # no configs/ folder here
    name = CONFIG_FILES[0].stem
    assert Path(configs.resolve(spelling.format(name))).read_bytes() == CONFIG_FILES[0].read_bytes()


def test_resolve_prefers_a_file_and_leaves_unknown_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = CONFIG_FILES[0].stem
    (tmp_path / f"{name}.yaml").write_text("benchmark: mine\n")
    assert configs.resolve(f"{name}.yaml") == f"{name}.yaml"     # the user's own file wins
    assert configs.resolve("no-such-config") == "no-such-config"
    assert configs.resolve("elsewhere/" + name) == "elsewhere/" + name


def test_run_check_by_name_and_unknown_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    name = CONFIG_FILES[0].stem
    # found by name and validated; --check then checks its paths, which a shipped
    # config leaves as placeholders for the user's data
    assert cli.main(["run", name, "--check"]) == 2
    err = capsys.readouterr().err
    assert "data_root: /path/to/" in err and "does not exist" in err and "no such config" not in err
    with pytest.raises(run.ConfigError, match="nor a shipped config .*" + name):
        run.load_config("no-such-config")


def test_readme_becomes_a_description_without_relative_links():
    pr = _pypi_readme()
    text = (ROOT / "README.md").read_text()
    out = pr.rewrite(text)
    assert pr.relative_refs(out) == []
    assert "https://arxiv.org/abs/2512.13072" in out
    # the README's first two commands are kept word for word
    assert "bash scripts/setup.sh && .venv/bin/mgcl demo" in out
    with_base = pr.rewrite(text, "https://example.org/raw/abc")
    assert pr.relative_refs(with_base) == []
    if "](docs/demo_curves.png)" in text:
        assert "](https://example.org/raw/abc/docs/demo_curves.png)" in with_base


def test_relative_refs_finds_each_kind():
    pr = _pypi_readme()
    bad = pr.relative_refs('[a](docs/x.md) ![b](./p.png) <img src="q.png"> see ../shared/SPEC.md '
                           '[ok](https://x.org/y) [anchor](#install)')
    assert bad[:2] == ["docs/x.md", "./p.png"] and len(bad) == 4


def test_check_exit_status(tmp_path):
    pr = _pypi_readme()
    good, bad = tmp_path / "good.md", tmp_path / "bad.md"
    good.write_text("[paper](https://arxiv.org/abs/2512.13072)\n")
    bad.write_text("![plot](docs/demo_curves.png)\n")
    assert pr.main([str(good), "--check"]) == 0
    assert pr.main([str(bad), "--check"]) == 1
    pr.main([str(bad)])                                          # rewrite in place
    assert pr.main([str(bad), "--check"]) == 0 and "docs/demo_curves.png" in bad.read_text()
    assert os.path.getsize(bad) > 0
