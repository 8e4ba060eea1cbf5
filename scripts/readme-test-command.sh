#!/usr/bin/env bash
# Print the test command from README.md: the first line of the sh block after
# the "test-command" marker. .ci/run runs exactly this line.
set -euo pipefail
cd "$(dirname "$0")/.."
awk '/<!-- test-command/ {marked = 1; next}
     marked && /^```/   {if (inside) exit; inside = 1; next}
     inside             {print; exit}' README.md
