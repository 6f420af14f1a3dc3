//! The attribute macros of weir-sdk: `#[filter]`, `#[enrich]` and `#[aggregate]`.
//!
//! Use them through `weir_sdk`, which documents them. Each keeps the item as written (the
//! function stays callable by name, for native tests) and adds, beside it:
//!
//! - a `static __WEIR_CONFIG` holding the config built by `init`;
//! - `__weir_*` functions that call the SDK's batch loops (`weir_sdk::__private`) with the
//!   author's function; they compile on every target, so a mistake shows up in `cargo test`.
//!   They take a `Batch` (a verified view), not bytes, so they are sound to call from any safe
//!   code: natively a buffer becomes a `Batch` only through `Batch::verify`;
//! - off `wasm32`, a public module `__weir_native` (filters and enrich functions): `init` and
//!   `call`, one batch's bytes verified and run through the `__weir_*` function, returning the
//!   events out. `weir bench CRATE_DIR` builds a small native program on the plugin crate (an
//!   rlib too) that calls them, to time the plugin's own code natively beside its component;
//! - on `wasm32` only, a module `__weir_component` with `wit_bindgen::generate!` for the one
//!   world of the attribute (read from the workspace's `wit/` folder, whose absolute path is
//!   computed here from this crate's location) and the `export!` of an implementation that
//!   forwards to the `__weir_*` functions. That implementation is the one place that reads the
//!   host's buffer with `Batch::trusted`, without verifying it again: the host verified it
//!   (see the SDK's `runtime` module), and the implementation is private to the module, so only
//!   the canonical ABI export calls it. The host interface is taken from the SDK's bindings
//!   (`with:`), and wit-bindgen's runtime through `weir_sdk::__private::wit_bindgen`
//!   (`runtime_path`), so a plugin crate depends on nothing but weir-sdk.
//!
//! Only one attribute per crate: a component exports exactly one world. A second one is a
//! compile error (the names above are defined twice).

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{ToTokens, quote};
use syn::spanned::Spanned;
use syn::{FnArg, ItemFn, ItemImpl, Type, parse_macro_input};

/// Marks `fn(&Event[, &C]) -> bool | Result<bool>` as the plugin's filter (see weir-sdk).
#[proc_macro_attribute]
pub fn filter(attr: TokenStream, item: TokenStream) -> TokenStream {
    let item = parse_macro_input!(item as ItemFn);
    expand_fn(attr.into(), item, Kind::Filter)
        .unwrap_or_else(|e| e.to_compile_error())
        .into()
}

/// Marks `fn(&Event, &mut Emitter[, &C]) -> () | Result<()>` as the plugin's enrich function
/// (see weir-sdk).
#[proc_macro_attribute]
pub fn enrich(attr: TokenStream, item: TokenStream) -> TokenStream {
    let item = parse_macro_input!(item as ItemFn);
    expand_fn(attr.into(), item, Kind::Enrich)
        .unwrap_or_else(|e| e.to_compile_error())
        .into()
}

/// Marks `impl weir_sdk::Aggregate for T` as the plugin's aggregate (see weir-sdk).
#[proc_macro_attribute]
pub fn aggregate(attr: TokenStream, item: TokenStream) -> TokenStream {
    let item = parse_macro_input!(item as ItemImpl);
    expand_aggregate(attr.into(), item)
        .unwrap_or_else(|e| e.to_compile_error())
        .into()
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Filter,
    Enrich,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Filter => "filter",
            Kind::Enrich => "enrich",
        }
    }

    /// Parameters before the optional config parameter.
    fn fixed_params(self) -> usize {
        match self {
            Kind::Filter => 1,
            Kind::Enrich => 2,
        }
    }

    fn signature(self) -> &'static str {
        match self {
            Kind::Filter => "fn(&Event[, &Config]) -> bool | Result<bool>",
            Kind::Enrich => "fn(&Event, &mut Emitter[, &Config]) -> () | Result<()>",
        }
    }
}

fn no_args(attr: TokenStream2, kind: &str) -> syn::Result<()> {
    if attr.is_empty() {
        Ok(())
    } else {
        Err(syn::Error::new(
            attr.span(),
            format!("`#[weir_sdk::{kind}]` takes no arguments"),
        ))
    }
}

fn expand_fn(attr: TokenStream2, item: ItemFn, kind: Kind) -> syn::Result<TokenStream2> {
    no_args(attr, kind.name())?;
    let sig = &item.sig;
    let wrong = |span: Span, what: &str| {
        syn::Error::new(
            span,
            format!(
                "`#[weir_sdk::{}]` {what}: expected `{}`",
                kind.name(),
                kind.signature()
            ),
        )
    };
    if sig.asyncness.is_some() {
        return Err(wrong(sig.asyncness.span(), "cannot be async"));
    }
    if !sig.generics.params.is_empty() {
        return Err(wrong(sig.generics.span(), "cannot be generic"));
    }
    let params: Vec<&FnArg> = sig.inputs.iter().collect();
    if let Some(FnArg::Receiver(r)) = params.first() {
        return Err(wrong(r.span(), "must be a free function"));
    }
    let fixed = kind.fixed_params();
    if params.len() != fixed && params.len() != fixed + 1 {
        return Err(wrong(sig.inputs.span(), "wrong number of parameters"));
    }
    let config = match params.get(fixed) {
        Some(FnArg::Typed(p)) => match &*p.ty {
            Type::Reference(r) if r.mutability.is_none() => Some(r.elem.to_token_stream()),
            other => return Err(wrong(other.span(), "the config parameter must be `&C`")),
        },
        _ => None,
    };
    let name = &sig.ident;
    let config_ty = config
        .clone()
        .unwrap_or_else(|| quote!(::weir_sdk::NoConfig));
    let call = match (kind, config.is_some()) {
        (Kind::Filter, true) => quote!(|event, config| #name(event, config)),
        (Kind::Filter, false) => quote!(|event, _config| #name(event)),
        (Kind::Enrich, true) => quote!(|event, out, config| #name(event, out, config)),
        (Kind::Enrich, false) => quote!(|event, out, _config| #name(event, out)),
    };
    let (glue, export, count) = match kind {
        Kind::Filter => (
            quote! {
                #[doc(hidden)]
                #[allow(dead_code)]
                fn __weir_filter(
                    batch: ::weir_sdk::__private::Batch<'_>,
                ) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    ::weir_sdk::__private::filter(&__WEIR_CONFIG, batch, #call)
                }
            },
            quote! {
                fn filter(batch: ::std::vec::Vec<u8>) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    // SAFETY: the host verified `batch` before the call (weir-sdk's `runtime`).
                    super::__weir_filter(unsafe { ::weir_sdk::__private::Batch::trusted(&batch) })
                }
            },
            quote! {
                let n = batch.len();
                super::__weir_filter(batch).map(|bits| ::weir_sdk::__private::kept(&bits, n))
            },
        ),
        Kind::Enrich => (
            quote! {
                #[doc(hidden)]
                #[allow(dead_code)]
                fn __weir_enrich(
                    batch: ::weir_sdk::__private::Batch<'_>,
                ) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    ::weir_sdk::__private::enrich(&__WEIR_CONFIG, batch, #call)
                }
            },
            quote! {
                fn enrich(batch: ::std::vec::Vec<u8>) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    // SAFETY: the host verified `batch` before the call (weir-sdk's `runtime`).
                    super::__weir_enrich(unsafe { ::weir_sdk::__private::Batch::trusted(&batch) })
                }
            },
            quote! {
                super::__weir_enrich(batch).map(|out| ::weir_sdk::__private::events(&out))
            },
        ),
    };
    let common = common(&config_ty);
    let component = component(kind.name(), export);
    Ok(quote! {
        #item
        #common
        #glue
        #component

        /// The plugin called natively, as `weir bench CRATE_DIR` does beside its component.
        #[doc(hidden)]
        #[cfg(not(target_arch = "wasm32"))]
        pub mod __weir_native {
            /// Builds the config from (key, JSON) pairs, as the component's `init`.
            pub fn init(
                config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
            ) -> ::std::result::Result<(), ::std::string::String> {
                super::__weir_init(config)
            }

            /// Runs one batch (its bytes verified first) through the plugin; the events out.
            pub fn call(bytes: &[u8]) -> ::std::result::Result<usize, ::std::string::String> {
                let batch = ::weir_sdk::__private::Batch::verify(bytes).map_err(|e| e.to_string())?;
                #count
            }
        }
    })
}

fn expand_aggregate(attr: TokenStream2, item: ItemImpl) -> syn::Result<TokenStream2> {
    no_args(attr, "aggregate")?;
    let expected = "`#[weir_sdk::aggregate]` goes on `impl weir_sdk::Aggregate for T`";
    let Some((_, trait_path, _)) = &item.trait_ else {
        return Err(syn::Error::new(item.self_ty.span(), expected));
    };
    if trait_path
        .segments
        .last()
        .is_none_or(|s| s.ident != "Aggregate")
    {
        return Err(syn::Error::new(trait_path.span(), expected));
    }
    if !item.generics.params.is_empty() {
        return Err(syn::Error::new(
            item.generics.span(),
            "`#[weir_sdk::aggregate]`: the accumulator type cannot be generic",
        ));
    }
    let acc = &item.self_ty;
    let config_ty = quote!(<#acc as ::weir_sdk::Aggregate>::Config);
    let common = common(&config_ty);
    let glue = quote! {
        #[doc(hidden)]
        #[allow(dead_code)]
        fn __weir_fold(
            batch: ::weir_sdk::__private::Batch<'_>,
            groups: impl ::std::iter::IntoIterator<Item = (::std::option::Option<::std::vec::Vec<u8>>, ::std::vec::Vec<u32>)>,
        ) -> ::std::result::Result<::std::vec::Vec<::std::vec::Vec<u8>>, ::std::string::String> {
            ::weir_sdk::__private::fold::<#acc>(&__WEIR_CONFIG, batch, groups)
        }

        #[doc(hidden)]
        #[allow(dead_code)]
        fn __weir_finish(
            windows: impl ::std::iter::IntoIterator<Item = (::weir_sdk::Window, ::std::option::Option<::std::vec::Vec<u8>>)>,
        ) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
            ::weir_sdk::__private::finish::<#acc>(&__WEIR_CONFIG, windows)
        }

        #[doc(hidden)]
        #[allow(dead_code)]
        fn __weir_state_layout() -> ::std::string::String {
            <#acc as ::weir_sdk::Aggregate>::state_layout()
        }
    };
    let export = quote! {
        fn fold(
            batch: ::std::vec::Vec<u8>,
            groups: ::std::vec::Vec<bindings::weir::plugin::types::Group>,
        ) -> ::std::result::Result<::std::vec::Vec<::std::vec::Vec<u8>>, ::std::string::String> {
            // SAFETY: the host verified `batch` before the call (weir-sdk's `runtime`).
            let batch = unsafe { ::weir_sdk::__private::Batch::trusted(&batch) };
            super::__weir_fold(batch, groups.into_iter().map(|g| (g.window.acc, g.events)))
        }

        fn finish(
            windows: ::std::vec::Vec<bindings::weir::plugin::types::Window>,
        ) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
            super::__weir_finish(windows.into_iter().map(|w| {
                (::weir_sdk::Window::new(w.key, w.start_ms, w.end_ms), w.acc)
            }))
        }

        fn state_layout() -> ::std::string::String {
            super::__weir_state_layout()
        }
    };
    let component = component("aggregate", export);
    Ok(quote! {
        #item
        #common
        #glue
        #component
    })
}

/// The config cell and the `init` glue, shared by every kind.
fn common(config_ty: &TokenStream2) -> TokenStream2 {
    quote! {
        #[doc(hidden)]
        static __WEIR_CONFIG: ::weir_sdk::__private::ConfigCell<#config_ty> =
            ::weir_sdk::__private::ConfigCell::new();

        #[doc(hidden)]
        #[allow(dead_code)]
        fn __weir_init(
            config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
        ) -> ::std::result::Result<(), ::std::string::String> {
            ::weir_sdk::__private::init(&__WEIR_CONFIG, config)
        }
    }
}

/// The wasm-only component: bindings for `world` and the export of its implementation.
fn component(world: &str, exports: TokenStream2) -> TokenStream2 {
    let wit = wit_dir();
    quote! {
        #[doc(hidden)]
        #[cfg(target_arch = "wasm32")]
        #[allow(missing_docs, clippy::all, unsafe_op_in_unsafe_fn, unused)]
        mod __weir_component {
            mod bindings {
                ::weir_sdk::__private::wit_bindgen::generate!({
                    world: #world,
                    path: #wit,
                    runtime_path: "::weir_sdk::__private::wit_bindgen::rt",
                    with: {
                        "weir:plugin/host@0.1.0": ::weir_sdk::__private::host,
                    },
                });
            }

            struct Plugin;

            impl bindings::Guest for Plugin {
                fn init(
                    config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    super::__weir_init(config)
                }

                #exports
            }

            bindings::export!(Plugin with_types_in bindings);
        }
    }
}

/// The absolute path of the workspace's `wit/` folder: the one copy of the contract.
fn wit_dir() -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../wit");
    let dir = dir.canonicalize().unwrap_or(dir);
    dir.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use syn::parse_quote;

    fn fn_error(item: ItemFn, kind: Kind) -> String {
        match expand_fn(TokenStream2::new(), item, kind) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_wit_folder_is_found() {
        let wit = std::path::PathBuf::from(wit_dir());
        assert!(wit.join("weir.wit").is_file(), "{}", wit.display());
    }

    #[test]
    fn expansion_keeps_the_function_and_names_the_world() {
        let item: ItemFn = parse_quote!(
            fn tag(e: &Event, out: &mut Emitter, cfg: &Cfg) {}
        );
        let out = expand_fn(TokenStream2::new(), item, Kind::Enrich)
            .map(|t| t.to_string())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(out.starts_with("fn tag"), "{out}");
        assert!(out.contains("ConfigCell < Cfg >"), "{out}");
        assert!(out.contains("world : \"enrich\""), "{out}");
        assert!(out.contains("tag (event , out , config)"), "{out}");
    }

    #[test]
    fn only_the_wasm_export_glue_skips_verification() {
        let filter: ItemFn = parse_quote!(
            fn keep(e: &Event) -> bool {
                true
            }
        );
        let enrich: ItemFn = parse_quote!(
            fn tag(e: &Event, out: &mut Emitter) {}
        );
        let aggregate: ItemImpl = parse_quote!(impl weir_sdk::Aggregate for Count {});
        let expansions = [
            expand_fn(TokenStream2::new(), filter, Kind::Filter),
            expand_fn(TokenStream2::new(), enrich, Kind::Enrich),
            expand_aggregate(TokenStream2::new(), aggregate),
        ];
        for out in expansions {
            let out = out.map(|t| t.to_string()).unwrap_or_else(|e| panic!("{e}"));
            // The `__weir_*` functions, compiled on every target, take a `Batch` view.
            let (glue, component) = out
                .split_once("mod __weir_component")
                .unwrap_or_else(|| panic!("{out}"));
            assert!(
                glue.contains("batch : :: weir_sdk :: __private :: Batch < '_ >"),
                "{out}"
            );
            assert!(!glue.contains("trusted"), "{out}");
            assert!(!glue.contains("unsafe {"), "{out}");
            // The wasm-only export reads the host's buffer without verifying it again.
            let cfg = glue.rfind("# [cfg (target_arch = \"wasm32\")]");
            assert!(cfg.is_some_and(|at| !glue[at..].contains(" fn ")), "{out}");
            assert!(component.contains("Batch :: trusted (& batch)"), "{out}");
        }
    }

    #[test]
    fn config_parameter_is_optional() {
        let item: ItemFn = parse_quote!(
            fn keep(e: &Event) -> bool {
                true
            }
        );
        let out = expand_fn(TokenStream2::new(), item, Kind::Filter)
            .map(|t| t.to_string())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(out.contains(":: weir_sdk :: NoConfig"), "{out}");
        assert!(out.contains("keep (event)"), "{out}");
    }

    #[test]
    fn wrong_signatures_are_explained() {
        let err = fn_error(
            parse_quote!(
                fn keep() -> bool {
                    true
                }
            ),
            Kind::Filter,
        );
        assert_eq!(
            err,
            "`#[weir_sdk::filter]` wrong number of parameters: expected \
             `fn(&Event[, &Config]) -> bool | Result<bool>`"
        );
        let err = fn_error(
            parse_quote!(
                fn tag(e: &Event, out: &mut Emitter, c: Cfg) {}
            ),
            Kind::Enrich,
        );
        assert!(err.contains("the config parameter must be `&C`"), "{err}");
        let err = fn_error(
            parse_quote!(
                async fn keep(e: &Event) -> bool {
                    true
                }
            ),
            Kind::Filter,
        );
        assert!(err.contains("cannot be async"), "{err}");
    }

    #[test]
    fn aggregate_goes_on_an_aggregate_impl() {
        let item: ItemImpl = parse_quote!(impl Count { fn f() {} });
        let err = expand_aggregate(TokenStream2::new(), item).map(|_| ());
        assert!(err.is_err());
        let item: ItemImpl = parse_quote!(impl weir_sdk::Aggregate for Count {});
        let out = expand_aggregate(TokenStream2::new(), item)
            .map(|t| t.to_string())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            out.contains("< Count as :: weir_sdk :: Aggregate > :: Config"),
            "{out}"
        );
        assert!(out.contains("world : \"aggregate\""), "{out}");
    }
}
