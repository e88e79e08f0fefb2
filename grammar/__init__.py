"""The .tdsl grammar, installed as ``triton_dsl.grammar`` (package data: ``tdsl.lark``)."""
