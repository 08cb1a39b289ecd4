#!/usr/bin/env bash
# Install what the tests need (Xvfb and GL libraries included) and run them.
#   bash scripts/test.sh [PYTEST ARGS]
# Without arguments the suite is followed by the Qt-bindings smoke pass: the docks (one run each,
# on tiny slides) under PyQt6 and PySide6, in a virtual environment that sees this one's packages
# (the suite itself runs under PyQt5). It is skipped, with one line, when the bindings cannot be
# installed (no network) or PATHOSEG_QT_SMOKE=0; PATHOSEG_QT_SMOKE=1 runs it after a filtered suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
PY="${PYTHON:-python3}"

smoke_wanted=0
[ "$#" -eq 0 ] && smoke_wanted=1
[ -n "${PATHOSEG_QT_SMOKE:-}" ] && smoke_wanted="$PATHOSEG_QT_SMOKE"

status=0
"$PY" -m pytest -q -p no:cacheprovider "$@" || status=$?
[ "$smoke_wanted" = 1 ] || exit "$status"

# --------------------------------------------------------------------------- Qt bindings smoke
# Every dock opened in the demo window (all of them under the binding), then runs on tiny slides
# (synchronous jobs) of the docks whose Qt code differs most: pixmaps (Slide), layers from a job
# (Nuclei, Tissue), a sortable table with key events (Review), a live table (Cohort). About 30 s
# per binding on an idle 2-core machine; the same tests run under PyQt5 in the suite above.
SMOKE_TESTS=(
  tests/test_slide_widget.py::test_demo_gui_opens_slide_with_all_docks
  tests/test_slide_widget.py::test_slide_widget_open_and_mask
  tests/test_nuclei_widget.py::test_drawn_rectangle_labels_sit_over_the_slide_in_the_slides_units
  tests/test_tissue_cli_dock.py::test_tissue_dock_rectangle
  tests/test_review_widget.py::test_table_sorts_by_any_column_numerically_and_rows_keep_their_tile
  tests/test_cohort_widget.py::test_dock_runs_a_cohort_and_opens_a_finished_slide
)
present=()
for t in "${SMOKE_TESTS[@]}"; do [ -f "${t%%::*}" ] && present+=("$t"); done

venv="${PATHOSEG_QT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/napari-pathoseg/qt-bindings}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import PyQt6.QtWidgets, PySide6.QtWidgets" >/dev/null 2>&1; then
  if ! { "$PY" -m venv --system-site-packages "$venv" >/dev/null 2>&1 &&
         timeout 300 "$venv/bin/python" -m pip install -q --disable-pip-version-check PyQt6 PySide6-Essentials >/dev/null 2>&1; }; then
    echo "Qt bindings smoke: SKIPPED: PyQt6 / PySide6 could not be installed into $venv (no network?); the suite above ran under PyQt5"
    exit "$status"
  fi
fi
for api in pyqt6 pyside6; do
  echo "Qt bindings smoke: ${#present[@]} dock tests under $api"
  QT_API="$api" PYTEST_QT_API="$api" "$venv/bin/python" -m pytest -q -p no:cacheprovider "${present[@]}" || status=$?
done
exit "$status"
