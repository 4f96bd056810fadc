#!/usr/bin/env bash
# Index a folder and search it from the command line.
#
#   examples/search_cli.sh                 # offline: tiny test model, pydicom's sample DICOM files
#   examples/search_cli.sh FOLDER          # your own folder
#   MI_MODEL=/path/to/2024.09.27 examples/search_cli.sh FOLDER   # the real weights
#
# Without MI_MODEL this uses the tiny random-weight model in tests/fixtures/medimageinsight-tiny:
# it runs offline, but its rankings mean nothing. With the real weights the commands are the same.
# Needs the commands installed: pip install -e . (see README).
set -euo pipefail
command -v mi-search >/dev/null || { echo "mi-search not found: run pip install -e . first" >&2; exit 1; }
here="$(cd "$(dirname "$0")/.." && pwd)"
export MI_MODEL="${MI_MODEL:-$here/tests/fixtures/medimageinsight-tiny}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export MI_INDEX="$(mktemp -d)/index"    # a throwaway index; leave MI_INDEX unset to use the default
folder="${1:-$(python -c 'import pathlib, pydicom; print(pathlib.Path(pydicom.__file__).parent / "data" / "test_files")')}"

set -x
mi-index "$folder"                                   # build (or update) the index (a summary, the first skipped files)
mi-search "chest x-ray" -k 5                         # text query
mi-search "chest x-ray" -k 5 --modality CT --json    # filtered, as JSON
first="$(mi-search "chest x-ray" -k 1 --paths)"      # --paths: one path per line, for pipes
mi-search "$first" -k 3                              # image query: the image itself comes first
mi-search "$first" - "2:artifact" -k 3 --labels "ct scan,mri scan,chest x-ray"
