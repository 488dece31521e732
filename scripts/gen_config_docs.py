"""Regenerate docs/configuration.md and schemas/*.schema.json from the pydantic models.

    python scripts/gen_config_docs.py          # writes the files
    python scripts/gen_config_docs.py --check  # exit 1 when a checked-in file differs
"""
import sys
from pathlib import Path

from moeforge.schema import generated_files

ROOT = Path(__file__).resolve().parent.parent


def main(check: bool) -> int:
    stale = []
    for rel, text in generated_files().items():
        path = ROOT / rel
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(rel)
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    for rel in stale:
        print(f"{'differs' if check else 'wrote'}: {rel}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main("--check" in sys.argv[1:]))
