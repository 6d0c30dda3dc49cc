#!/usr/bin/env bash
# Check lorasynth training on the GPUs of this machine: bf16-mixed DDP on every visible GPU.
#
#   scripts/check_gpu.sh [REPO] [WORK_DIR]
#
# REPO defaults to this script's repository; the Python used is $PYTHON, else REPO/.venv/bin/python,
# else `python` (a venv with lorasynth installed, or its requirements with REPO on PYTHONPATH).
# Nothing is downloaded: a small planted pack is built here (lorasynth.worlds.planted), then
#   1. `train latent --kind vae` and `train hypernet` with --accelerator gpu --devices auto --strategy ddp
#      --precision bf16-mixed (one process per GPU; per-device batch B, global batch B x GPUs);
#   2. the same on one GPU in fp32 with the same global batch, as the reference;
# and one JSON object with what was checked goes to stdout (logs go to WORK_DIR/*.log).
# Exit status 0 when every check passed. STEPS, BATCH (per device) and N_IDS size the run;
# ACCELERATOR=cpu CPU_DEVICES=2 STEPS=30 N_IDS=600 rehearses the script without a GPU.
set -u
REPO="$(cd "${1:-$(dirname "$0")/..}" && pwd)"
WORK="${2:-$(mktemp -d -t lorasynth-gpu-XXXXXX)}"
mkdir -p "$WORK"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY=python; fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
STEPS="${STEPS:-300}"
BATCH="${BATCH:-64}"   # per device
N_IDS="${N_IDS:-4000}"

"$PY" - "$WORK" "$N_IDS" <<'EOF' > "$WORK/pack.log" 2>&1
import sys
from lorasynth.worlds.planted import SyntheticWorldConfig, make_world, tiny_layout, write_world_pack
world = make_world(SyntheticWorldConfig(n_identities=int(sys.argv[2]), layout=tiny_layout(), seed=0))
print(write_world_pack(world, sys.argv[1] + "/pack"))
EOF
PACK_RC=$?
ACCEL="${ACCELERATOR:-gpu}"
if [ "$ACCEL" = cpu ]; then
  NDEV="${CPU_DEVICES:-2}"; DEVICES="$NDEV"
else
  NDEV=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0); DEVICES=auto
fi
GLOBAL=$((BATCH * (NDEV > 0 ? NDEV : 1)))

run() {  # name, then the lorasynth arguments; exit status and seconds go to WORK/name.{rc,s}
  local name=$1; shift
  local t0; t0=$(date +%s)
  "$PY" -m lorasynth.apps.cli.main "$@" > "$WORK/$name.log" 2>&1
  echo $? > "$WORK/$name.rc"
  echo $(( $(date +%s) - t0 )) > "$WORK/$name.s"
}
if [ "$PACK_RC" = 0 ] && [ "$NDEV" -gt 0 ]; then
  DDP=(--accelerator "$ACCEL" --devices "$DEVICES" --strategy ddp --precision bf16-mixed --no-progress)
  run ddp_vae train latent --kind vae --pack "$WORK/pack" --out "$WORK/ddp" --latent-dim 64 --holdout 0.1 --steps "$STEPS" \
      --batch-size "$BATCH" --lr 3e-3 "${DDP[@]}"
  run ddp_hypernet train hypernet --model "$WORK/ddp" --width 256 --depth 2 --steps "$STEPS" --batch-size "$BATCH" \
      --lr 2e-3 "${DDP[@]}"
  ONE=(--accelerator "$ACCEL" --devices 1 --precision 32-true --no-progress)
  run one_vae train latent --kind vae --pack "$WORK/pack" --out "$WORK/one" --latent-dim 64 --holdout 0.1 --steps "$STEPS" \
      --batch-size "$GLOBAL" --lr 3e-3 "${ONE[@]}"
  run one_hypernet train hypernet --model "$WORK/one" --width 256 --depth 2 --steps "$STEPS" --batch-size "$GLOBAL" \
      --lr 2e-3 "${ONE[@]}"
fi

"$PY" - "$WORK" "$NDEV" "$STEPS" "$BATCH" "$PACK_RC" "$ACCEL" <<'EOF'
import csv, json, sys
from pathlib import Path

work, ndev, steps, batch, pack_rc = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
accel = sys.argv[6]
ngpu = ndev if accel != "cpu" else 0
out = {"work_dir": str(work), "accelerator": accel, "devices": ndev, "steps": steps, "batch_per_device": batch,
       "global_batch": batch * max(ndev, 1), "checks": {}, "numbers": {}}
checks, numbers = out["checks"], out["numbers"]
try:
    import torch
    import lightning
    out["torch"], out["lightning"] = torch.__version__, lightning.__version__
    out["cuda"] = torch.version.cuda
    out["gpu_names"] = [torch.cuda.get_device_name(i) for i in range(ngpu)]
    if ngpu:
        checks["bf16_supported"] = bool(torch.cuda.is_bf16_supported())
except Exception as e:  # noqa: BLE001
    out["error"] = f"torch: {e}"
checks["pack_built"] = pack_rc == 0
checks["devices_present"] = ndev > 0


def read(name, suffix):
    f = work / f"{name}.{suffix}"
    return f.read_text().strip() if f.is_file() else None


def losses(run_dir):
    rows = []
    for f in sorted(run_dir.glob("logs/version_*/metrics.csv")):
        rows += [(int(r["step"]), float(r["train_loss"])) for r in csv.DictReader(open(f)) if r.get("train_loss")]
    return rows


for name, model, part, summary in (("ddp_vae", "ddp", "vae", "trained vae"),
                                   ("ddp_hypernet", "ddp", "hypernet", "trained hypernetwork"),
                                   ("one_vae", "one", "vae", "trained vae"),
                                   ("one_hypernet", "one", "hypernet", "trained hypernetwork")):
    rc = read(name, "rc")
    if rc is None:
        continue
    log = read(name, "log") or ""
    checks[f"{name}_exit_0"] = rc == "0"
    numbers[f"{name}_seconds"] = float(read(name, "s") or 0)
    run_dir = work / model / "train" / part
    ls = losses(run_dir)
    export = work / model / ("latent" if part == "vae" else "hypernet")
    checks[f"{name}_one_summary"] = log.count(summary) == 1
    checks[f"{name}_one_export"] = export.is_dir() and len(list(export.glob("*.safetensors"))) == 1
    checks[f"{name}_steps_done"] = bool(ls) and max(s for s, _ in ls) + 1 >= steps - 10  # logged every 10 steps
    if ls:
        k = max(1, len(ls) // 4)
        first, last = sum(v for _, v in ls[:k]) / k, sum(v for _, v in ls[-k:]) / k
        numbers[f"{name}_loss_first_last"] = [round(first, 5), round(last, 5)]
        checks[f"{name}_loss_falls"] = last < first
    if name.startswith("ddp"):
        checks[f"{name}_ranks_started"] = sum(f"GLOBAL_RANK: {r}," in log for r in range(ndev)) == ndev

if ndev:  # what --accelerator gpu --precision bf16-mixed gives Lightning: bf16 autocast, float32 weights
    import tempfile

    from lorasynth.training.lightning import TrainConfig, make_trainer

    t = make_trainer(tempfile.mkdtemp(), TrainConfig(accelerator=accel, devices=1, precision="bf16-mixed", progress=False))
    plugin = t.precision_plugin
    checks["bf16_mixed_plugin"] = type(plugin).__name__ == "MixedPrecision" and plugin.precision == "bf16-mixed"

if checks.get("ddp_hypernet_exit_0") and checks.get("one_hypernet_exit_0"):
    from lorasynth.synthesis.evaluation import evaluate
    from lorasynth.synthesis.synthesizer import Synthesizer

    for model in ("ddp", "one"):
        res = evaluate(Synthesizer(str(work / model)), strategies=("diffusion",), pca_baseline=False)
        numbers[f"{model}_heldout_recon_cosine"] = round(res["latent"]["reconstruction_delta_cosine"], 4)
        numbers[f"{model}_heldout_diffusion_cosine"] = round(res["strategies"]["diffusion"]["delta_cosine_mean"], 4)
        numbers[f"{model}_mean_lora_cosine"] = round(res["strategies"]["mean_lora"]["delta_cosine_mean"], 4)
    for key in ("recon", "diffusion"):
        a, b = numbers[f"ddp_heldout_{key}_cosine"], numbers[f"one_heldout_{key}_cosine"]
        checks[f"{key}_cosine_ddp_bf16_vs_one_device_fp32_within_0.05"] = abs(a - b) < 0.05
out["ok"] = bool(checks) and all(checks.values())
print(json.dumps(out, indent=2))
sys.exit(0 if out["ok"] else 1)
EOF
