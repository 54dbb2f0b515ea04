from storage.base import AlreadyExists, LocalStore, NotFound, S3Store, Store, StoreError, open_store, validate_key

__all__ = ["AlreadyExists", "LocalStore", "NotFound", "S3Store", "Store", "StoreError", "open_store", "validate_key"]
