"""The `dynllava generate` command end to end on a YAML-built model."""

from __future__ import annotations

import json

from dynllava.cli import main

from tests.conftest import random_image


def test_generate_json(tiny_yaml, tmp_path, capsys):
    image = tmp_path / "x.png"
    random_image(0).save(image)
    rc = main(["generate", "--model", tiny_yaml, "--image", str(image), "--prompt", "what is it?", "--json",
               "--vision-keep", "0.25", "--text-keep", "0.5", "--vision-scorer", "stride", "--text-scorer",
               "recent", "--max-new-tokens", "6", "--device", "cpu"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stats"]["n_image_kept"] == 4 and out["stats"]["n_image_tokens"] == 16
    assert out["sparsity"]["vision_keep"] == 0.25 and len(out["token_ids"]) <= 6


def test_generate_errors_are_one_clear_line(tiny_yaml, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["generate", "--model", tiny_yaml, "--image", str(bad), "--prompt", "x", "--device", "cpu"]) == 2
    assert "images[0]: unreadable image" in capsys.readouterr().err
    rc = main(["generate", "--model", tiny_yaml, "--image", str(bad), "--prompt", "x", "--vision-keep", "0.2"])
    assert rc == 2 and "learned vision scorer needs predictor weights" in capsys.readouterr().err
    assert main(["generate", "--model", "no-such-model", "--prompt", "x"]) == 2
    assert "nothing is downloaded" in capsys.readouterr().err
