"""Raw data -> RecBole atomic files + per-item feature files (the contract of recbole_mm.data).

Scripts (each runnable as ``python dataset_conversion/<name>.py`` or ``python -m dataset_conversion.<name>``):
    amazon.py           Amazon Reviews 2018 / 2014 (reviews + metadata) -> atomic files, image URL list
    movielens.py        MovieLens ml-100k (recbole wheel / GroupLens) and ml-1m -> ready dataset with features
    download_images.py  image URL list -> image files (resumable, bounded retries), separate from encoding
    encode_features.py  item texts / images -> <Dataset>.<modality>.npy (+ .mask.npy, manifest entry)
    unisrec.py          UniSRec/MISSRec benchmark folders (read directly by the hook) -> + <Dataset>.item texts
"""
