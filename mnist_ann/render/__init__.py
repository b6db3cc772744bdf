"""Pictures and report files made from what evaluation measured."""
