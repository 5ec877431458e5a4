"""Serving peers for ``make bench``: the same graphs served the way other frameworks' users would serve them."""
