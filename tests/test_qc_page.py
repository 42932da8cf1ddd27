"""The static QC page: content parsed back with html.parser, escaping, links, warnings."""

from __future__ import annotations

import doctest
import math
from html.parser import HTMLParser
from urllib.parse import unquote

import numpy as np

import planar3d.qc_page as qc_page
from planar3d.qc_page import QCRow, scan_warnings, write_qc_page


class _Table(HTMLParser):
    """Cells (text) of each body row, img/a attributes, and every tag seen."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.rows, self.images, self.links, self.tags, self.row_classes = [], [], [], [], []
        self._cell = None
        self._in_body = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows.append([])
            self.row_classes.append(attrs.get("class"))
        elif tag == "td" and self._in_body:
            self._cell = ""
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "li" and self._cell is not None:
            self._cell += "|" if self._cell else ""

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.rows[-1].append(self._cell)
            self._cell = None
        elif tag == "tbody":
            self._in_body = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _parse(path):
    parser = _Table()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def test_doctests():
    assert doctest.testmod(qc_page).failed == 0


def test_page_content_escaping_and_links(tmp_path):
    nasty = "a<b>&c\nd \"e\".nii.gz"
    (tmp_path / "qc").mkdir()
    rows = [
        QCRow("sub-01_FLAIR.nii.gz", "qc/sub-01_FLAIR.png", 3, 1.23456, 4.25, []),
        QCRow(nasty, tmp_path / "qc" / "a<b>&c d.png", 0, 0.0, math.nan, ["no lesion found", "x < y & z"]),
        QCRow("no_montage.nii", None, 1, 0.5, 2.0, []),
    ]
    path = write_qc_page(tmp_path, rows, title="QC <run>")
    assert path == tmp_path / "qc" / "index.html"
    assert sorted(p.name for p in (tmp_path / "qc").iterdir()) == ["index.html"]  # no temporary file left
    page = _parse(path)
    assert page.rows == [
        ["sub-01_FLAIR.nii.gz", "", "3", "1.235", "4.2", ""],
        [nasty, "", "0", "0.000", "", "no lesion found|x < y & z"],
        ["no_montage.nii", "(no montage)", "1", "0.500", "2.0", ""],
    ]
    assert page.row_classes == ["ok", "warn", "ok"]
    # links are relative to qc/ and percent-encoded; decoded they name the files
    assert [unquote(image["src"]) for image in page.images] == ["sub-01_FLAIR.png", "a<b>&c d.png"]
    assert page.links == [image["src"] for image in page.images]
    assert page.images[1]["alt"] == f"montage of {nasty}"
    # static: no script, no external resource, nothing but the tags we write
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    text = path.read_text(encoding="utf-8")
    assert "http" not in text and "a<b>" not in text
    assert "<title>QC &lt;run&gt;</title>" in text
    assert "3 scans, 4 lesions, 1 with warnings." in text


def test_montage_outside_qc_folder_is_linked_relatively(tmp_path):
    path = write_qc_page(tmp_path, [QCRow("s", "sub-01/anat/s_qc.png")])
    assert _parse(path).images[0]["src"] == "../sub-01/anat/s_qc.png"


def test_scan_warnings():
    rng = np.random.default_rng(0)
    head = np.zeros((20, 20, 20), np.float32)
    head[2:18, 2:18, 2:18] = rng.normal(300, 30, (16, 16, 16))  # 4096 head voxels
    lesion = np.zeros(head.shape, bool)
    lesion[5:9, 5:9, 5:9] = True  # 64 voxels: 1.6 % of the head
    assert scan_warnings(head, lesion) == []
    assert scan_warnings(head, np.zeros(head.shape)) == ["no lesion found"]
    big = np.zeros(head.shape, bool)
    big[2:18, 2:18, 2:6] = True  # 1024 voxels: 25 %
    assert scan_warnings(head, big) == ["lesion load 25% of the head (over 10%)"]
    assert scan_warnings(head, big, head_mask=np.ones(head.shape)) == ["lesion load 13% of the head (over 10%)"]
    half = np.zeros(head.shape, bool)
    half[2:18, 2:18, 2:4] = True  # 512 voxels: 12.5 % of the 4096 bright voxels, 6.4 % of a given 8000-voxel head
    assert scan_warnings(head, half) == ["lesion load 12% of the head (over 10%)"]
    assert scan_warnings(head, half, head_mask=np.ones(head.shape)) == []
    bad = head.copy()
    bad[0, 0, :3] = [np.nan, np.inf, -np.inf]
    assert scan_warnings(bad) == ["3 non-finite voxels (NaN or infinite)"]
    assert scan_warnings(np.full((3, 3, 3), 7.0)) == ["constant intensity (7)"]
    assert scan_warnings(np.full((2, 2, 2), np.nan)) == ["8 non-finite voxels (NaN or infinite)", "no finite intensity at all"]
    labels = (np.arange(1000).reshape(10, 10, 10) % 3).astype(np.int16)
    assert scan_warnings(labels) == ["suspicious intensity range: only 3 distinct values (a mask or label image?)"]
