"""The extension's description, checked the way the Slicer Extensions Index checks it.

The index's CI (ExtensionsIndex/scripts/check_description_files.py) clones the repository and
reads the top-level CMakeLists.txt as text: project() must be the extension's name, the icon and
screenshot URLs must be literal http(s) URLs of PNG/JPEG images, the category one it knows, the
repository name should contain "Slicer", and a LICENSE file must be in the repository root. It
then downloads the images; offline, this test checks instead that each URL names a file of this
repository that exists and is an image, and that all URLs name the same repository.
"""
from __future__ import annotations

import re
import urllib.parse as urlparse
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CMAKE = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
REQUIRED = ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
            "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS")
# From the index's check script (the categories extensions use today), the ones that fit FMCT.
ACCEPTED_CATEGORIES = ("Quantification", "Segmentation", "Analysis", "Neuroimaging", "Training")


def cmake_variables(text: str) -> dict[str, str]:
    """set(NAME "value" ...) as the index reads them (the first quoted value), ${VAR} expanded."""
    values: dict[str, str] = {}
    for name, value in re.findall(r'set\s*\(\s*(\w+)\s+"([^"]*)"', text):
        values.setdefault(name, re.sub(r"\$\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), value))
    return values


VARIABLES = cmake_variables(CMAKE)


def test_project_name_is_the_extension_name():
    assert re.findall(r"project\s*\(\s*([^\s)]+)", CMAKE, re.IGNORECASE)[0] == "FMCT"


@pytest.mark.parametrize("name", REQUIRED)
def test_required_fields_are_set(name):
    assert VARIABLES.get(name, "").strip(), f"{name} is missing or empty"


def test_category_is_one_the_index_knows():
    assert VARIABLES["EXTENSION_CATEGORY"] in ACCEPTED_CATEGORIES


def test_contributors_are_name_and_organisation():
    for contributor in VARIABLES["EXTENSION_CONTRIBUTORS"].split(","):
        assert re.fullmatch(r"\s*[^()]+\s\([^()]+\)\s*", contributor), f"'{contributor}' is not 'Name (Organization)'"


def _image_urls() -> list[str]:
    # the index's own regular expressions: literal strings, no CMake variables
    icon = re.findall(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', CMAKE, re.IGNORECASE | re.MULTILINE)
    shots = re.findall(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', CMAKE, re.IGNORECASE | re.MULTILINE)
    assert icon and shots, "EXTENSION_ICONURL / EXTENSION_SCREENSHOTURLS must be literal strings"
    return [icon[0].strip()] + shots[0].split()


def _repository(url: str) -> tuple[str, str, str]:
    """(owner, repository, path in the repository) of a github.com or raw.githubusercontent.com URL."""
    parts = urlparse.urlsplit(url)
    assert parts.scheme == "https" and parts.netloc in ("github.com", "raw.githubusercontent.com"), url
    segments = parts.path.strip("/").split("/")
    if parts.netloc == "raw.githubusercontent.com":
        return segments[0], segments[1], "/".join(segments[3:])
    return segments[0], segments[1], "/".join(segments[4:]) if len(segments) > 4 else ""


def test_image_urls_are_wellformed_and_name_images_of_this_repository():
    for url in _image_urls():
        assert url.startswith("http") and "${" not in url, url
        assert url.lower().endswith((".png", ".jpg", ".jpeg", ".gif")), url
        owner, name, path = _repository(url)
        image = REPO / path
        assert image.is_file(), f"{url} names {path}, which is not in this repository"
        assert image.read_bytes()[:8] in (b"\x89PNG\r\n\x1a\n",) or image.read_bytes()[:3] == b"\xff\xd8\xff", path


def test_all_urls_name_the_same_repository_and_it_is_named_for_slicer():
    homepage = VARIABLES["EXTENSION_HOMEPAGE"]
    assert urlparse.urlsplit(homepage).scheme == "https" and "${" not in homepage
    repositories = {_repository(url)[:2] for url in [VARIABLES["FMCT_REPOSITORY_URL"], *_image_urls()]}
    assert len(repositories) == 1, f"the URLs name different repositories: {repositories}"
    (owner, name), = repositories
    assert "slicer" in name.lower(), "the index asks for 'Slicer' in the repository name"
    assert homepage.startswith(VARIABLES["FMCT_REPOSITORY_URL"])
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"{owner}/{name}" in readme, "README's 'Publishing the extension' names the placeholder to replace"


def test_license_is_in_the_root_and_is_the_one_pyproject_declares():
    license_text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    assert 'license = { text = "Apache-2.0" }' in (REPO / "pyproject.toml").read_text(encoding="utf-8")


def test_the_extension_carries_the_engine_configs_and_every_module_file():
    assert "Resources/Configs/*" in CMAKE and "FMCT_CONFIG_FILES" in CMAKE
    for module in ("FMCT", "FMCTTraining"):
        listed = (REPO / module / "CMakeLists.txt").read_text(encoding="utf-8")
        for path in (REPO / module / f"{module}Lib").glob("*.py"):
            assert f"${{MODULE_NAME}}Lib/{path.name}" in listed, f"{module}/CMakeLists.txt does not install {path.name}"
