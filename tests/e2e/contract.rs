//! The backend contract in README.md is the SQL the code and the tests use.

use storekeyd::storage::contract::{READ_KEY, UPSERT_KEY};

#[test]
fn readme_documents_the_exact_backend_statements() {
    let readme = include_str!("../../README.md");
    for sql in [UPSERT_KEY, READ_KEY] {
        assert!(
            readme.contains(sql),
            "README.md must contain, verbatim:\n{sql}"
        );
    }
}
