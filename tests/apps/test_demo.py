"""Smoke test of the embedded default (`make demo`) at a smaller size."""

import json

from lorasynth.apps.demo import SMOKE, run_demo


def test_demo_smoke_writes_every_file_and_reuses_its_cache(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    first = run_demo(out, SMOKE, cache)
    for name in ("astronaut_diffusion.safetensors", "astronaut_blend.safetensors", "astronaut_nearest.safetensors",
                 "new_identity_sample.safetensors", "astronaut_blended_with_library.safetensors", "previews.png",
                 "eval.json", "eval.png", "latent_map.png", "report.md", "summary.json"):
        assert (out / name).stat().st_size > 100, name
    report = (out / "report.md").read_text()
    ev = json.loads((out / "eval.json").read_text())
    # the report's figures are the ones computed in this run
    assert f"{ev['strategies']['blend']['delta_cosine_mean']:.4f}" in report
    assert "random weights" in report and "lorasynth synthesize --face" in report
    assert all(v > 0 for v in first["preview_mean_abs_pixel_change"].values())  # the LoRA changes the image

    second = run_demo(tmp_path / "out2", SMOKE, cache)
    assert any("(cached)" in k for k in second["timings_s"])
    assert second["total_s"] < first["total_s"]
    assert (tmp_path / "out2" / "astronaut_diffusion.safetensors").read_bytes() == \
        (out / "astronaut_diffusion.safetensors").read_bytes()
