"""The backend-agnostic core: queries, the object model, the Trolley and storage."""
