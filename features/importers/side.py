"""Side tables (users / items) and surfaces: named derive hooks and integer coding of side features.

MovieLens surfaces group an item's genres into five surfaces, first match wins (precedence):

  family:   Animation, Children's, Fantasy, Musical
  action:   Action, Adventure, Sci-Fi, War, Western
  thriller: Thriller, Crime, Horror, Mystery, Film-Noir
  comedy:   Comedy
  drama:    everything else (Drama, Romance, Documentary, unknown)

So "Toy Story" (Animation|Children's|Comedy) is family and "GoldenEye" (Action|Adventure|Thriller)
is action. On ML-100K this gives 35k action, 19k drama, 18k comedy, 17k thriller, 11k family
ratings: every surface has enough events for its own expert. MovieLens side features: users segment = age bucket (1: <18, 2: 18-24, 3: 25-34,
4: 35-44, 5: 45-49, 6: 50-55, 7: 56+, the ML-1M codes), region = occupation index + 1; items
category = primary (first listed) genre index + 1 in the canonical 19-genre order, brand = release
decade bucket (1 = before 1930, ..., 8 = 1990s and later). 0 always means unknown.

Any other side feature is coded generically: integers that fit int32 are kept; otherwise the sorted
distinct string values get codes 1..n; empty or missing values get 0.
"""

from __future__ import annotations

from collections.abc import Callable

import polars as pl

GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
GENRE_FLAG_COLUMNS = (
    "g_unknown",
    "g_action",
    "g_adventure",
    "g_animation",
    "g_children",
    "g_comedy",
    "g_crime",
    "g_documentary",
    "g_drama",
    "g_fantasy",
    "g_film_noir",
    "g_horror",
    "g_musical",
    "g_mystery",
    "g_romance",
    "g_sci_fi",
    "g_thriller",
    "g_war",
    "g_western",
)
SURFACE_GROUPS = (  # (surface, genres) in precedence order
    ("family", ("Animation", "Children's", "Fantasy", "Musical")),
    ("action", ("Action", "Adventure", "Sci-Fi", "War", "Western")),
    ("thriller", ("Thriller", "Crime", "Horror", "Mystery", "Film-Noir")),
    ("comedy", ("Comedy",)),
)
FALLBACK_SURFACE = "drama"
AGE_CUTS = (18, 25, 35, 45, 50, 56)  # ML-1M age codes are the lower bounds of buckets 2..7


def _genre_list(frame: pl.DataFrame) -> pl.Expr:
    """List of genre names: from 19 flag columns (100K) or a 'A|B' string (1M)."""
    if "genres" in frame.columns:
        return pl.col("genres").str.split("|")
    flags = [
        pl.when(pl.col(c) == "1").then(pl.lit(g)) for c, g in zip(GENRE_FLAG_COLUMNS, GENRES, strict=True)
    ]
    return pl.concat_list(flags).list.drop_nulls()


def movielens_items(frame: pl.DataFrame) -> pl.DataFrame:
    genres = _genre_list(frame)
    surface = pl.lit(FALLBACK_SURFACE)
    for name, members in reversed(SURFACE_GROUPS):
        surface = (
            pl.when(genres.list.eval(pl.element().is_in(members)).list.any())
            .then(pl.lit(name))
            .otherwise(surface)
        )
    year_text = (
        pl.col("release_date").str.slice(-4)
        if "release_date" in frame.columns
        else pl.col("title").str.extract(r"\((\d{4})\)\s*$")
    )
    year = year_text.cast(pl.Int32, strict=False)
    primary = genres.list.first().replace_strict(list(GENRES), list(range(1, len(GENRES) + 1)), default=0)
    return frame.with_columns(
        surface.alias("surface"),
        primary.cast(pl.Int32).alias("primary_genre"),
        pl.when(year.is_null())
        .then(0)
        .otherwise(((year - 1920) // 10).clip(0, 7) + 1)
        .cast(pl.Int32)
        .alias("year_bucket"),
    )


def movielens_users(frame: pl.DataFrame) -> pl.DataFrame:
    age = pl.col("age").cast(pl.Int32, strict=False)
    bucket = pl.lit(1, pl.Int32)
    for i, cut in enumerate(AGE_CUTS, start=2):
        bucket = pl.when(age >= cut).then(pl.lit(i, pl.Int32)).otherwise(bucket)
    occupation = pl.col("occupation")
    if frame["occupation"].cast(pl.Int32, strict=False).null_count() == 0:  # ML-1M: already an index
        code = occupation.cast(pl.Int32) + 1
    else:  # ML-100K: names; alphabetical like u.occupation
        names = sorted(frame["occupation"].unique().to_list())
        code = occupation.replace_strict(names, list(range(1, len(names) + 1)), default=0).cast(pl.Int32)
    return frame.with_columns(
        pl.when(age.is_null()).then(0).otherwise(bucket).alias("age_bucket"), code.alias("occupation_code")
    )


def kuairand_items(frame: pl.DataFrame) -> pl.DataFrame:
    """KuaiRand video tags look like '8,35' (or empty): the first tag is the category."""
    tag = pl.col("tag").fill_null("") if "tag" in frame.columns else pl.lit("")
    return frame.with_columns(tag.str.split(",").list.first().str.strip_chars().alias("first_tag"))


DERIVE: dict[str, Callable[[pl.DataFrame], pl.DataFrame]] = {
    "movielens_items": movielens_items,
    "movielens_users": movielens_users,
    "kuairand_items": kuairand_items,
}


def code_feature(column: pl.Series) -> pl.Series:
    """Side feature -> int32 code (see module docstring); 0 = unknown."""
    text = column.cast(pl.String).fill_null("").str.strip_chars()
    as_int = text.cast(pl.Int64, strict=False)
    known = text != ""
    fits = as_int.filter(known)
    if fits.null_count() == 0 and (fits.len() == 0 or (fits.min() >= 0 and fits.max() < 2**31)):  # type: ignore[operator]
        return as_int.fill_null(0).cast(pl.Int32)
    values = sorted(text.filter(known).unique().to_list())
    return text.replace_strict(values, list(range(1, len(values) + 1)), default=0, return_dtype=pl.Int32)


def side_features(
    frame: pl.DataFrame,
    id_col: str,
    features: dict[str, str],
    derive: str,
    out_id: str,
    wanted: tuple[str, ...],
) -> pl.DataFrame:
    """(out_id Int64, each wanted feature Int32 [, surface]) from a string side table; first row per id wins."""
    if derive:
        if derive not in DERIVE:
            raise ValueError(f"mapping: unknown derive hook {derive!r}; known: {sorted(DERIVE)}")
        frame = DERIVE[derive](frame)
    unknown = sorted(set(features) - set(wanted))
    missing = [c for c in [id_col, *features.values()] if c not in frame.columns]
    if unknown or missing:
        raise ValueError(
            f"mapping side table: unknown features {unknown} (allowed {list(wanted)}) or columns "
            f"{missing} missing from {frame.columns}"
        )
    out = frame.select(
        pl.col(id_col).cast(pl.Int64, strict=False).alias(out_id),
        *([pl.col("surface")] if "surface" in frame.columns else []),
        *[pl.col(c) for c in set(features.values())],
    )
    out = out.filter(pl.col(out_id).is_not_null()).unique(out_id, keep="first", maintain_order=True)
    coded = {name: code_feature(out[col]) for name, col in features.items()}
    return out.select(out_id, *(["surface"] if "surface" in out.columns else [])).with_columns(
        *[coded.get(name, pl.Series(name, [0] * out.height, pl.Int32)).alias(name) for name in wanted]
    )
