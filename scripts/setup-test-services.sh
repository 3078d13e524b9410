#!/usr/bin/env bash
# Installs what the test suite's services need (filled in by the Label Studio harness work).
set -euo pipefail
