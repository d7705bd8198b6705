"""Data Docs that render with no network, as hospital sites run.

GX's own pages load Bootstrap, bootstrap-table, jQuery, Font Awesome and Vega from CDNs and fill the index
page's tables with a script, so offline the index shows no rows and the results lose their pass/fail icons.
The views here render the same pages from templates in ``docs_templates/`` that GX's are looked up after:
a page without any remote stylesheet or script (a little CSS inline instead), and the index tables written
out as plain HTML rows. :func:`site_config` is the Data Docs site of a gate (:mod:`cass.quality.gate`).

This module subclasses GX classes, so it imports Great Expectations: only a gate's context loads it, after
:func:`cass.quality.gate.import_gx` has turned GX's analytics off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from great_expectations.render.view import DefaultJinjaPageView
from jinja2 import ChoiceLoader, FileSystemLoader

TEMPLATES = Path(__file__).with_name("docs_templates")


class OfflinePageView(DefaultJinjaPageView):
    """A Data Docs page (suite, validation result or index) that needs nothing from the network."""

    _template = "offline_page.j2"

    def __init__(self, custom_styles_directory: Any = None, custom_views_directory: Any = None) -> None:
        super().__init__(custom_styles_directory, custom_views_directory)
        self.env.loader = ChoiceLoader([FileSystemLoader(str(TEMPLATES)), self.env.loader])


def site_config(docs_dir: Path) -> dict[str, Any]:
    """The SiteBuilder config of a gate's Data Docs site in ``docs_dir``, every page rendered offline."""
    view = {"module_name": __name__, "class_name": OfflinePageView.__name__}
    return {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder", "view": view},
        "site_section_builders": {
            "expectations": {"view": view},
            "validations": {"view": view},
            "profiling": {"view": view},
        },
    }
