"""``attnbench report``: one page of every result, one section per kind (``page``), opening with
the verdict (``verdict``); its CSS and scripts are package data (``assets/``)."""
