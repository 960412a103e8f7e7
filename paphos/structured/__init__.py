"""Structured output: grammars compiled by xgrammar (`compiler`), and the per-request matcher that
fills each step's token bitmask (`matcher`). xgrammar is imported only when a request asks for a
constraint, so engines that never see one run without it installed."""
