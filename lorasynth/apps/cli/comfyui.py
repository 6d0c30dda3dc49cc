"""``comfyui install``: put lorasynth's node pack into a ComfyUI installation."""

from __future__ import annotations


def register(sub) -> None:
    from lorasynth.apps.cli.helpfmt import examples

    p = sub.add_parser("comfyui", help="ComfyUI node pack: install it into a ComfyUI folder",
                       epilog=examples("lorasynth comfyui install ~/ComfyUI"))
    cmds = p.add_subparsers(dest="comfyui_command", metavar="SUBCOMMAND")
    q = cmds.add_parser("install", help="symlink the node pack into COMFY_DIR/custom_nodes and create models/lorasynth",
                        description="Install lorasynth's ComfyUI node pack: a symlink in COMFY_DIR/custom_nodes and "
                                    "the models/lorasynth folder for model folders.",
                        epilog=examples("lorasynth comfyui install ~/ComfyUI",
                                        "lorasynth comfyui install ~/ComfyUI --name lorasynth-dev"))
    q.add_argument("comfy_dir", metavar="COMFY_DIR", help="the ComfyUI installation folder")
    q.add_argument("--name", default=None, help="folder name under custom_nodes (default comfyui-lorasynth)")
    q.set_defaults(func=cmd_install)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def cmd_install(args) -> int:
    from lorasynth.apps.comfyui.install import LINK_NAME, install

    for line in install(args.comfy_dir, args.name or LINK_NAME):
        print(line)
    return 0
