"""lorasynth's ComfyUI nodes.

Types: ``LORASYNTH_MODEL`` (a loaded synthesis model), ``LORA`` (lorasynth's in-memory
:class:`~lorasynth.core.lora.LoRA`), and ComfyUI's own ``MODEL``, ``CLIP``, ``IMAGE``.
Applying goes through ComfyUI's own LoRA patching (``comfy.sd.load_lora_for_models``) with
kohya keys, which ComfyUI maps completely, so model management, offloading and unpatching
work as for any LoRA file.

ComfyUI modules (``folder_paths``, ``comfy.*``) are imported only inside the node methods,
which run inside ComfyUI; lorasynth's heavier parts are imported on first use too, so
loading the pack at ComfyUI start-up is cheap. Bad inputs raise a LorasynthError with a
one-line message, which ComfyUI shows on the node.
"""

from __future__ import annotations

import os
import re
import sys

CATEGORY = "lorasynth"
#: ComfyUI model folder (``models/lorasynth``) holding synthesis model folders.
MODEL_FOLDER = "lorasynth"
MODEL_FILE = "lorasynth_model.json"  # same name as lorasynth.models.model_folder.MODEL_FILE (checked by a test)
LORA_TYPE = "LORA"
MODEL_TYPE = "LORASYNTH_MODEL"
STRATEGY_CHOICES = ["diffusion", "blend", "nearest", "sample"]  # lorasynth.synthesis.synthesizer.STRATEGIES (checked by a test)


# --------------------------------------------------------------------------- ComfyUI folders
def register_model_folder() -> None:
    """Register ``models/lorasynth`` with ComfyUI's ``folder_paths`` (idempotent).

    Paths given for ``lorasynth`` in ComfyUI's ``extra_model_paths.yaml`` are kept beside it.
    """
    import folder_paths

    path = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    paths, _ = folder_paths.folder_names_and_paths.setdefault(MODEL_FOLDER, ([], set()))
    if path not in paths:
        paths.insert(0, path)


#: the model list walks at most this deep and this many folders (a symlink loop or a huge tree cannot hang ComfyUI)
MAX_WALK_DEPTH = 8
MAX_WALK_FOLDERS = 10_000


def synthesis_model_names() -> list[str]:
    """Synthesis model folders (those holding ``lorasynth_model.json``) under every ``models/lorasynth`` path.

    Links to model folders are followed (each real folder is visited once, so a link loop ends),
    at most :data:`MAX_WALK_DEPTH` deep and :data:`MAX_WALK_FOLDERS` folders per path.
    """
    import folder_paths

    register_model_folder()
    names = set()
    for root in folder_paths.get_folder_paths(MODEL_FOLDER):
        if os.path.isdir(root):
            names.update(bounded_model_walk(root))
    return sorted(names)


def bounded_model_walk(root: str, max_depth: int = MAX_WALK_DEPTH, max_folders: int = MAX_WALK_FOLDERS) -> set[str]:
    """Relative names of the folders under ``root`` holding ``lorasynth_model.json`` (see :func:`synthesis_model_names`)."""
    names: set[str] = set()
    seen: set[tuple[int, int]] = set()
    stack = [(root, 0)]
    while stack and len(seen) < max_folders:
        here, depth = stack.pop()
        try:
            st = os.stat(here)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(here) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:  # a broken link, a loop, no permission: skipped
            continue
        if any(e.name == MODEL_FILE for e in entries):
            names.add(os.path.relpath(here, root).replace(os.sep, "/"))
            continue  # a model folder's sub-folders are its parts, not models
        if depth >= max_depth:
            continue
        subdirs = []
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=True):
                    subdirs.append((e.is_symlink(), e.name, e.path))
            except OSError:
                pass
        # real folders first, then links (a linked model folder is listed under its real name when both are here)
        stack.extend((path, depth + 1) for _, _, path in sorted(subdirs, reverse=True))
    return names


def synthesis_model_path(name: str) -> str:
    import folder_paths

    from lorasynth.errors import ModelError

    register_model_folder()
    for root in folder_paths.get_folder_paths(MODEL_FOLDER):
        root = os.path.abspath(root)
        path = os.path.normpath(os.path.join(root, name))  # lexical: symlinked model folders are fine
        inside = os.path.commonpath([path, root]) == root and path != root
        if inside and os.path.isfile(os.path.join(path, MODEL_FILE)):
            return path
    raise ModelError(f"no lorasynth synthesis model {name!r} under models/{MODEL_FOLDER}")


if "folder_paths" in sys.modules:  # imported by ComfyUI (it loads custom nodes after its own modules)
    register_model_folder()


# --------------------------------------------------------------------------- image helpers
def image_to_rgb(image):
    """First image of a ComfyUI IMAGE batch (B x H x W x C float 0..1) as an H x W x 3 uint8 array."""
    import numpy as np

    from lorasynth.errors import ImageError

    if getattr(image, "ndim", 0) != 4 or image.shape[0] < 1:
        raise ImageError(f"expected a ComfyUI IMAGE batch (B x H x W x C), got shape {tuple(getattr(image, 'shape', ()))}")
    arr = image[0].detach().float().cpu().clamp(0, 1).numpy()
    return np.ascontiguousarray(np.rint(arr[:, :, :3] * 255).astype(np.uint8))


def rgb_to_image(rgb):
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)[None]


# --------------------------------------------------------------------------- nodes
class LoadSynthesisModel:
    """A lorasynth synthesis model folder from ``models/lorasynth/``."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model_name": (synthesis_model_names(),)}}

    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("lorasynth_model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, model_name):
        from lorasynth.apps.comfyui.engine import SynthesisEngine

        return (SynthesisEngine(synthesis_model_path(model_name)),)


class SynthesizeLoRAFromFace:
    """One face photo -> an identity LoRA (no training) and the face crop it used."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lorasynth_model": (MODEL_TYPE,),
                "image": ("IMAGE",),
                "face_index": ("INT", {"default": 0, "min": 0, "max": 64}),  # 0 = the largest face
                "strategy": (STRATEGY_CHOICES, {"default": "diffusion"}),
                "guidance": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 20.0, "step": 0.1}),  # 0 = model default
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
            }
        }

    RETURN_TYPES = (LORA_TYPE, "IMAGE")
    RETURN_NAMES = ("lora", "face")
    FUNCTION = "synthesize"
    CATEGORY = CATEGORY

    def synthesize(self, lorasynth_model, image, face_index, strategy, guidance, seed):
        from lorasynth.errors import LorasynthError
        from lorasynth.apps.comfyui.engine import SynthesisEngine

        if not isinstance(lorasynth_model, SynthesisEngine):
            raise LorasynthError(f"lorasynth_model input is a {type(lorasynth_model).__name__}, not a lorasynth model")
        from lorasynth.core.numbers import parse_float, parse_int

        # NaN passes ComfyUI's min/max checks: every number is checked here (one line on the node)
        face_index = parse_int(face_index, "face_index", minimum=0, maximum=64)
        guidance = parse_float(guidance, "guidance", minimum=0.0, maximum=20.0)
        seed = parse_int(seed, "seed", minimum=0, maximum=0xFFFFFFFFFFFFFFFF)
        result = lorasynth_model.synthesize(image_to_rgb(image), face_index=face_index, strategy=strategy,
                                            guidance=guidance or None, seed=seed % 2**63)
        return (result.lora, rgb_to_image(result.crop))


class ApplyLoRA:
    """Patch MODEL and CLIP with a LORA through ComfyUI's own LoRA patching."""

    @classmethod
    def INPUT_TYPES(cls):
        strength = {"default": 1.0, "min": -20.0, "max": 20.0, "step": 0.01}
        return {
            "required": {
                "model": ("MODEL",),
                "clip": ("CLIP",),
                "lora": (LORA_TYPE,),
                "strength_model": ("FLOAT", strength),
                "strength_clip": ("FLOAT", strength),
            }
        }

    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, clip, lora, strength_model, strength_clip):
        from lorasynth.core.numbers import parse_float

        strength_model = parse_float(strength_model, "strength_model", minimum=-20.0, maximum=20.0)
        strength_clip = parse_float(strength_clip, "strength_clip", minimum=-20.0, maximum=20.0)
        return apply_lora(model, clip, lora, strength_model, strength_clip)


def apply_lora(model, clip, lora, strength_model: float, strength_clip: float):
    """``comfy.sd.load_lora_for_models`` with lorasynth's LoRA as a kohya state dict, checked first.

    Every module must map to a weight of ``model``/``clip`` with the right shape; otherwise a
    LayoutError says which (nothing is patched then).
    """
    import comfy.lora
    import comfy.sd

    from lorasynth.apps.comfyui.convert import as_lora, check_against_model, kohya_state_dict

    lora = as_lora(lora)
    key_map: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
        shapes.update({k: tuple(v.shape) for k, v in model.model.state_dict().items()})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        shapes.update({k: tuple(v.shape) for k, v in clip.cond_stage_model.state_dict().items()})
    check_against_model(lora, key_map, shapes)
    return comfy.sd.load_lora_for_models(model, clip, kohya_state_dict(lora), strength_model, strength_clip)


class BlendLoRAs:
    """Exact weighted sum of up to three LoRAs' updates; rank > 0 truncates optimally (SVD)."""

    @classmethod
    def INPUT_TYPES(cls):
        weight = {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}
        return {
            "required": {"lora_1": (LORA_TYPE,), "weight_1": ("FLOAT", weight),
                         "rank": ("INT", {"default": 0, "min": 0, "max": 1024})},  # 0 = exact (ranks add up)
            "optional": {"lora_2": (LORA_TYPE,), "weight_2": ("FLOAT", weight),
                         "lora_3": (LORA_TYPE,), "weight_3": ("FLOAT", weight)},
        }

    RETURN_TYPES = (LORA_TYPE,)
    RETURN_NAMES = ("lora",)
    FUNCTION = "blend"
    CATEGORY = CATEGORY

    def blend(self, lora_1, weight_1, rank, lora_2=None, weight_2=1.0, lora_3=None, weight_3=1.0):
        from lorasynth.core.blending import blend
        from lorasynth.apps.comfyui.convert import as_lora

        from lorasynth.core.numbers import parse_float, parse_int

        pairs = [(lora_1, weight_1), (lora_2, weight_2), (lora_3, weight_3)]
        loras = [(as_lora(lora, f"lora_{i + 1}"), parse_float(w, f"weight_{i + 1}", minimum=-10.0, maximum=10.0))
                 for i, (lora, w) in enumerate(pairs) if lora is not None]
        rank = parse_int(rank, "rank", minimum=0, maximum=1024)
        out, _ = blend([lora for lora, _ in loras], [w for _, w in loras], rank=rank or None)
        return (out,)


class LoadLoRAFile:
    """A LoRA file from ``models/loras`` in any layout lorasynth reads (kohya, diffusers, peft)."""

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {"lora_name": (folder_paths.get_filename_list("loras"),)}}

    RETURN_TYPES = (LORA_TYPE,)
    RETURN_NAMES = ("lora",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def IS_CHANGED(cls, lora_name):
        import folder_paths

        path = folder_paths.get_full_path("loras", lora_name)
        return os.stat(path).st_mtime_ns if path else ""

    def load(self, lora_name):
        import folder_paths

        from lorasynth.errors import FormatError
        from lorasynth.formats import load_lora
        from lorasynth.apps.comfyui.convert import check_sd15

        path = folder_paths.get_full_path("loras", lora_name)
        if path is None:
            raise FormatError(f"no LoRA file {lora_name!r} under models/loras")
        lora = load_lora(path)
        check_sd15(lora, f"LoRA {lora_name}")
        return (lora,)


class SaveLoRA:
    """Write a LORA as a kohya file into ``models/loras`` (the stock LoraLoader lists it)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora": (LORA_TYPE,), "filename_prefix": ("STRING", {"default": "lorasynth/face"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY

    def save(self, lora, filename_prefix):
        import folder_paths

        from lorasynth.formats import save_lora
        from lorasynth.apps.comfyui.convert import as_lora

        root = folder_paths.get_folder_paths("loras")[0]
        path = next_free_path(root, filename_prefix)
        save_lora(as_lora(lora), path, "kohya")
        name = os.path.relpath(path, root).replace(os.sep, "/")
        return {"ui": {"text": [name]}}


def next_free_path(root: str, prefix: str) -> str:
    """``root/<prefix>_00001.safetensors`` with the first unused counter; the prefix stays inside ``root``."""
    from lorasynth.errors import LorasynthError

    prefix = prefix.strip().replace("\\", "/") or "lorasynth"
    parts = [p for p in prefix.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts) or not parts:
        raise LorasynthError(f"filename_prefix {prefix!r} must stay inside models/loras")
    folder = os.path.join(root, *parts[:-1])
    os.makedirs(folder, exist_ok=True)
    pattern = re.compile(re.escape(parts[-1]) + r"_(\d{5})\.safetensors$")
    used = [int(m.group(1)) for f in os.listdir(folder) if (m := pattern.match(f))]
    return os.path.join(folder, f"{parts[-1]}_{max(used, default=0) + 1:05d}.safetensors")


NODE_CLASS_MAPPINGS = {
    "LorasynthLoadSynthesisModel": LoadSynthesisModel,
    "LorasynthSynthesizeLoRA": SynthesizeLoRAFromFace,
    "LorasynthApplyLoRA": ApplyLoRA,
    "LorasynthBlendLoRAs": BlendLoRAs,
    "LorasynthLoadLoRA": LoadLoRAFile,
    "LorasynthSaveLoRA": SaveLoRA,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LorasynthLoadSynthesisModel": "Load synthesis model (lorasynth)",
    "LorasynthSynthesizeLoRA": "Synthesize LoRA from face (lorasynth)",
    "LorasynthApplyLoRA": "Apply LoRA (lorasynth)",
    "LorasynthBlendLoRAs": "Blend LoRAs (lorasynth)",
    "LorasynthLoadLoRA": "Load LoRA file (lorasynth)",
    "LorasynthSaveLoRA": "Save LoRA (lorasynth)",
}
