#!/usr/bin/env python
"""A screenshot of ``helmlm serve``'s page after a real exchange, for docs/serving.md.

Starts ``helmlm serve MODEL_DIR`` on a free port of 127.0.0.1, opens its page in headless Chromium (the same driver
as the tests, tests/browser.py), sends each ``--say`` message through the chat box with the sampling settings given,
waits for every streamed reply, and saves the window as a PNG. Example:

    .venv/bin/python scripts/page_screenshot.py runs/models/smollm2-135m-instruct docs/serving-page.png \\
        --say "What is the capital of France?" --say "And of Italy?" --temperature 0 --max-tokens 40
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from browser import chromium, wait_for  # noqa: E402

from helmlm.serving import serve_process  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("out", help="the PNG to write")
    p.add_argument("--adapter", default=None)
    p.add_argument("--say", action="append", required=True, help="a user message (repeatable)")
    p.add_argument("--system", default=None)
    p.add_argument("--temperature", default="0")
    p.add_argument("--max-tokens", default="48")
    p.add_argument("--size", default="1100x720", help="window WIDTHxHEIGHT")
    args = p.parse_args(argv)

    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    extra = ["--adapter", args.adapter] if args.adapter else []
    with serve_process(args.model_dir, *extra) as (_, url):
        width, height = map(int, args.size.split("x"))
        with tempfile.TemporaryDirectory() as profile, chromium(Path(profile), width, height) as page:
            def state() -> str:
                return page.find_element(By.TAG_NAME, "body").get_attribute("data-state")

            page.get(url + "/")
            wait_for(lambda: state() == "ready", 60, "the page")
            for field, value in (("temperature", args.temperature), ("max_tokens", args.max_tokens),
                                 ("system", args.system)):
                if value is not None:
                    page.find_element(By.ID, field).clear()
                    page.find_element(By.ID, field).send_keys(value)
            for message in args.say:
                n = len(page.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
                page.find_element(By.ID, "prompt").send_keys(message, Keys.ENTER)
                wait_for(lambda n=n: len(page.find_elements(By.CSS_SELECTOR, ".msg.assistant")) > n
                         and state() == "ready", 600, "the reply")
            page.save_screenshot(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
