"""docs/configuration.md documents every setting."""

from pathlib import Path

from services.config import Settings

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_every_setting_is_documented():
    page = DOCS.read_text()
    missing = [name for name in Settings.model_fields if f"`PIPELINE_{name.upper()}`" not in page]
    assert not missing, f"add these settings to docs/configuration.md: {missing}"
