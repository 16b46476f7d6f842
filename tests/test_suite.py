"""Suite loading: every rejection the spine promises names the file, the field path and the line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from probe.spec.loader import SuiteError, load_suite
from tests.conftest import SUITES

GOOD = """
name: ok
models: [tiny]
probes:
  - name: p
    prompts: [a red apple]
"""


def problems(path: Path) -> list[tuple[int | None, str, str]]:
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    from probe.spec.yaml_source import format_path

    return [(line, format_path(p), msg) for line, p, msg in info.value.problems]


def only_problem(path: Path) -> tuple[int | None, str, str]:
    found = problems(path)
    assert len(found) == 1, found
    return found[0]


def test_good_suite_loads(write_suite):
    loaded = load_suite(write_suite(GOOD))
    assert loaded.suite.name == "ok"
    assert [p.prompt for p in loaded.prompts["p"]] == ["a red apple"]


def test_unknown_key_names_line_and_suggests(write_suite):
    path = write_suite("""
        name: ok
        models: [tiny]
        sedds: 3
        probes:
          - {name: p, prompts: [x]}
    """)
    line, field, message = only_problem(path)
    assert (line, field) == (3, "sedds")
    assert "unknown key 'sedds'" in message and "did you mean 'seeds'" in message


def test_unknown_key_in_model_entry(write_suite):
    path = write_suite("""
        name: ok
        models:
          - tiny
          - {preset: tiny, name: b, stpes: [4]}
        probes:
          - {name: p, prompts: [x]}
    """)
    assert only_problem(path)[:2] == (4, "models[1].stpes")


def test_unknown_preset_suggests(write_suite):
    path = write_suite(GOOD.replace("[tiny]", "[sd-trubo]"))
    line, field, message = only_problem(path)
    assert (line, field) == (2, "models[0].preset")
    assert "did you mean 'sd-turbo'" in message


def test_unknown_metric(write_suite):
    path = write_suite(GOOD + "    metrics: [clip_scor]\n")
    line, field, message = only_problem(path)
    assert (line, field) == (6, "probes[0].metrics[0]")
    assert "unknown metric 'clip_scor'" in message


def test_template_variable_without_values(write_suite):
    path = write_suite("""
        name: ok
        models: [tiny]
        probes:
          - name: p
            template: "a photo of {occupation}"
            vars:
              occupation: []
    """)
    assert only_problem(path) == (7, "probes[0].vars.occupation", "variable 'occupation' has no values")


def test_template_variable_missing_from_vars(write_suite):
    path = write_suite("""
        name: ok
        models: [tiny]
        probes:
          - name: p
            template: "a photo of {occupation} in {place}"
            vars:
              occupation: [a nurse]
    """)
    line, field, message = only_problem(path)
    assert (line, field) == (5, "probes[0].template")
    assert "{place}" in message


def test_size_not_multiple_of_8(write_suite):
    path = write_suite(GOOD + "size: [512, 500]\n")
    line, field, message = only_problem(path)
    assert (line, field) == (6, "size")
    assert "500" in message and "multiple of 8" in message


def test_img2img_pair_below_one_step_is_named(write_suite, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "init.png")  # init images are decoded at validation
    path = write_suite("""
        name: ok
        models: [tiny]
        probes:
          - name: p
            kind: img2img
            prompts: [x]
            init_images: [init.png]
            steps: [1, 4]
            strength: [0.5, 1.0]
    """)
    line, field, message = only_problem(path)
    assert (line, field) == (9, "probes[0].strength")
    assert "(steps=1, strength=0.5)" in message


def test_init_images_matching_no_file(write_suite):
    path = write_suite("""
        name: ok
        models: [tiny]
        probes:
          - name: p
            prompts: [x]
            init_images: [missing/*.png]
            strength: [1.0]
    """)
    line, field, message = only_problem(path)
    assert (line, field) == (6, "probes[0].init_images[0]")
    assert "matches no file" in message


def test_empty_prompt_list(write_suite):
    path = write_suite("""
        name: ok
        models: [tiny]
        probes:
          - name: p
            prompts: []
    """)
    assert only_problem(path)[:2] == (5, "probes[0].prompts")


def test_duplicate_probe_names(write_suite):
    path = write_suite(GOOD + "  - {name: p, prompts: [y]}\n")
    assert only_problem(path) == (6, "probes[1].name", "duplicate probe name 'p'")


def test_python_tags_are_refused(write_suite):
    path = write_suite("""
        name: ok
        models: [tiny]
        probes:
          - name: p
            prompts: !!python/object/apply:os.system ["echo owned"]
    """)
    line, _, message = only_problem(path)
    assert line == 5 and "!!python/object/apply:os.system" in message and "not allowed" in message


def test_duplicate_yaml_keys_are_refused(write_suite):
    path = write_suite(GOOD + "name: again\n")
    line, _, message = only_problem(path)
    assert line == 6 and "duplicate key 'name'" in message


def test_several_problems_reported_together(write_suite):
    path = write_suite("""
        name: ok
        models: [tiny, tiny]
        probes:
          - {name: p, prompts: [x], metrics: [nope]}
          - {name: p, prompts: [y]}
    """)
    assert len(problems(path)) == 3


def test_var_file_and_attrs(write_suite, tmp_path):
    (tmp_path / "occ.tsv").write_text("occupation\tshare\nnurse\t89.5\ndoctor\t40.1\n", encoding="utf-8")
    path = write_suite("""
        name: ok
        models: [tiny]
        probes:
          - name: p
            template: "a photo of a {occupation}"
            vars:
              occupation: {file: occ.tsv, column: occupation, attrs: [share]}
    """)
    items = load_suite(path).prompts["p"]
    assert [i.prompt for i in items] == ["a photo of a nurse", "a photo of a doctor"]
    assert items[0].attrs == {"share": "89.5"} and items[0].variables == {"occupation": "nurse"}


def test_var_file_with_missing_column(write_suite, tmp_path):
    (tmp_path / "occ.tsv").write_text("occupation\tshare\nnurse\t89.5\n", encoding="utf-8")
    path = write_suite("""
        name: ok
        models: [tiny]
        probes:
          - name: p
            template: "a photo of a {occupation}"
            vars:
              occupation: {file: occ.tsv, column: job}
    """)
    line, field, message = only_problem(path)
    assert (line, field) == (7, "probes[0].vars.occupation")
    assert "no column 'job'" in message


def test_cli_validate_exit_code_message_and_no_torch(write_suite):
    bad = write_suite(GOOD.replace("[tiny]", "[sd-trubo]"), name="bad.yaml")
    code = (
        "import sys; from typer.testing import CliRunner; from probe.cli.commands import app;"
        f"r = CliRunner().invoke(app, ['suites', 'validate', {str(SUITES / 'smoke.yaml')!r}, {str(bad)!r}]);"
        "print(r.output); print('torch' in sys.modules); sys.exit(r.exit_code)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "smoke.yaml: ok, 46 jobs" in proc.stdout
    assert f"{bad}:2: models[0].preset: unknown preset 'sd-trubo'" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False", "validate must not import torch"


@pytest.mark.parametrize("name", sorted(p.name for p in SUITES.glob("*.yaml")))
def test_shipped_suites_validate(name):
    loaded = load_suite(SUITES / name)
    assert loaded.suite.probes


def test_dataset_prompts_with_where_filter():
    loaded = load_suite(SUITES / "quality.yaml")
    items = loaded.prompts["parti"]
    challenges = {i.attrs["Challenge"] for i in items}
    assert challenges == {"Basic", "Simple Detail", "Fine-grained Detail", "Complex", "Style & Format", "Imagination"}
    assert len(items) == 272 + 232 + 312 + 113 + 206 + 150  # counts per challenge in PartiPrompts.tsv
    assert all(i.attrs["Category"] for i in items)


def test_dataset_neither_shipped_nor_pulled_says_how_to_get_it(write_suite, monkeypatch, tmp_path):
    from probe.spec import datasets

    monkeypatch.setenv("PROBE_DATA", str(tmp_path / "empty"))
    monkeypatch.setattr(datasets, "SHIPPED_DIR", tmp_path / "no-shipped-data")  # an install that lost its data
    path = write_suite("""
        name: ok
        models: [tiny]
        probes:
          - name: p
            prompts: {dataset: partiprompts, column: Prompt}
    """)
    line, field, message = only_problem(path)
    assert (line, field) == (5, "probes[0].prompts.dataset")
    assert "probe data pull partiprompts" in message


def test_control_characters_and_non_utf8_are_clear_errors(tmp_path):
    bad = tmp_path / "ctrl.yaml"
    bad.write_text("name: ok\nmodels: [tiny]\nprobes:\n  - {name: p, prompts: ['a \x07 bell']}\n")
    line, _, message = only_problem(bad)
    assert line == 4 and "U+0007" in message and "special characters are not allowed" in message
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert "not UTF-8" in only_problem(latin)[2]


def test_absolute_init_image_glob(write_suite, tmp_path):
    folder = tmp_path.parent / f"{tmp_path.name}-elsewhere"  # outside the suite's folder
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    path = write_suite(f"""
        name: ok
        models: [tiny]
        probes:
          - {{name: p, prompts: [x], init_images: ["{folder}/*.png"], steps: [4], strength: [0.5]}}
    """)
    loaded = load_suite(path)
    assert [i.path for i in loaded.init_images["p"]] == [str(folder / "a.png")]


def test_a_check_needs_exactly_one_bound(write_suite):
    path = write_suite(GOOD + "checks:\n  - {metric: clip_score, min: 1, max: 2}\n")
    line, field, message = only_problem(path)
    assert (line, field) == (7, "checks[0]") and "exactly one of min, max" in message


def test_duplicate_prompts_in_a_probe_are_rejected(write_suite):
    path = write_suite("""
        name: ok
        models: [tiny]
        probes:
          - {name: p, prompts: [a red apple, a blue car, a red apple]}
    """)
    line, field, message = only_problem(path)
    assert field == "probes[0].prompts" and "'a red apple' appears more than once" in message
    same_words_other_target = write_suite("""
        name: ok
        models: [tiny]
        probes:
          - name: p
            prompts: [{prompt: a shop sign, text: OPEN}, {prompt: a shop sign, text: CLOSED}]
    """, name="other.yaml")
    assert len(load_suite(same_words_other_target).prompts["p"]) == 2
