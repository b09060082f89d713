#!/usr/bin/env bash
# The dashboard's browser test needs Debian's chromium and its chromedriver (system packages; nothing
# is downloaded by the tests themselves). Install them when missing and this is root on Debian;
# otherwise say so: the browser test then skips with that reason.
set -uo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "installing chromium + chromium-driver (apt) for the dashboard's browser test ..."
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver \
            >/tmp/pdserve-browser-install.log 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
             --no-install-recommends chromium chromium-driver >>/tmp/pdserve-browser-install.log 2>&1; }; then
        exit 0
    fi
    echo "could not install chromium (see /tmp/pdserve-browser-install.log): the browser test will skip"
else
    echo "no chromium + chromedriver, and cannot install them here: the browser test will skip"
fi
exit 0
