"""Drawing only, one module per kind of result (``kernel``, ``accuracy``, ``resolution``,
``task_tables``) on the style every plot shares (``style``); plots read what they are given and
never run or finish a sweep."""
