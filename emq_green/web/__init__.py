"""The HTML pages shipped in the package (``router.html``, ``worker.html``)
and the helpers that serve them (:mod:`emq_green.web.pages`), used by the
router's dashboard and the worker's page. Import-free."""
