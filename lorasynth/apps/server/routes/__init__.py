"""The API's routers, one module per resource; each ``router(ctx)`` builds its ``APIRouter``.

``info`` (the page and ``/api/info``), ``faces`` (detection and synthesis), ``loras`` (results
and downloads), ``blend``, ``previews`` (generation jobs) and ``library`` (list, latent map,
nearest identities). :func:`lorasynth.apps.server.app.create_app` includes them in that order.
"""
