"""``cbmir ui``: a local web page to look at results (search by image or id, evaluation view)."""
