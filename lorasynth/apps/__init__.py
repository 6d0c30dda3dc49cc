"""Apps: the interfaces. The Python API facade, the CLI, the web server, the ComfyUI nodes and the demo.

They only wire: logic lives in the layers below, and every interface calls the same functions."""
