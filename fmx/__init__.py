"""fmx: the command line and the stage wrappers that wire features/, fm/ and experts/ together."""
