"""fmx: the command line and the stage wrappers that wire features/, fm/ and experts/ together."""

import features  # noqa: F401  (first: it sets the data layer's allocator settings before polars loads)
