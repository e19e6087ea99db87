"""A path or UPSTREAM/GROUP label may wrap after a slash; whatever it holds stays text (a path is captured,
attacker-controlled text)."""

from __future__ import annotations

import pytest

from monitor_ui.views import breaks_at_slash


@pytest.mark.parametrize(
    "text, html",
    [
        ("/v1/chat/completions", "/<wbr>v1/<wbr>chat/<wbr>completions"),
        ("azure/prod", "azure/<wbr>prod"),
        ("no-slash", "no-slash"),
        ("/v1/<img src=x onerror=alert(1)>", "/<wbr>v1/<wbr>&lt;img src=x onerror=alert(1)&gt;"),
        ('/v1/files?q="<script>"&x=1', "/<wbr>v1/<wbr>files?q=&#34;&lt;script&gt;&#34;&amp;x=1"),
    ],
)
def test_a_slash_may_break_and_markup_stays_text(text, html):
    assert str(breaks_at_slash(text)) == html
