//! `rabbitry tokens`: who may use the HTTP API.

use std::time::{Duration, SystemTime};

use clap::Subcommand;
use rabbitry_store::{NewToken, Scope, Store, StoreError};

use crate::{Failed, millis, print_json, time};

#[derive(Subcommand, Debug)]
pub(crate) enum TokensCommand {
    /// Make a token and print it — this once: only its SHA-256 is kept.
    Create {
        /// What it may do (repeat): read, admin, publish:<pattern> (e.g. publish:order.*).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// A label saying whose it is.
        #[arg(long, default_value = "api")]
        name: String,
        /// At most this many publishes, e.g. 100/s or 6000/min (whole per second).
        #[arg(long)]
        rate: Option<String>,
        /// It stops working after this long, e.g. 30days, 12h.
        #[arg(long)]
        expires: Option<String>,
    },
    /// List the tokens (never their secrets).
    List {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by id: it stops working at once.
    Revoke {
        /// Its id (from `tokens list`).
        id: String,
    },
}

/// `100/s`, `6000/min`, `100` (per second) → per second.
fn per_second(rate: &str) -> Result<u32, Failed> {
    let bad = || Failed::usage(format!("--rate {rate:?}: use N/s or N/min, e.g. 100/s"));
    let (n, unit) = rate.split_once('/').unwrap_or((rate, "s"));
    let n: u32 = n.trim().parse().map_err(|_| bad())?;
    // Whole publishes per second only: rounding 1/min up to 1/s would allow 60 times more.
    let per_second = match unit.trim() {
        "s" | "sec" | "second" => n,
        "min" | "m" | "minute" if n % 60 == 0 => n / 60,
        "min" | "m" | "minute" => {
            return Err(Failed::usage(format!(
                "--rate {rate:?}: a rate per minute must be a multiple of 60 (whole publishes per second)"
            )));
        }
        _ => return Err(bad()),
    };
    match per_second {
        0 => Err(bad()),
        n => Ok(n),
    }
}

pub(crate) async fn run(store: &str, command: TokensCommand) -> Result<(), Failed> {
    let store = Store::connect(store).await?;
    let result = async {
        match command {
            TokensCommand::Create {
                scopes,
                name,
                rate,
                expires,
            } => {
                let scopes = scopes
                    .iter()
                    .map(|s| Scope::parse(s))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| Failed::usage(e.to_string()))?;
                let mut new = NewToken::new(name, scopes);
                new.rate_per_second = rate.as_deref().map(per_second).transpose()?;
                if let Some(expires) = &expires {
                    let after: Duration = humantime::parse_duration(expires).map_err(|e| {
                        Failed::usage(format!("--expires {expires:?}: {e} (e.g. 30days, 12h)"))
                    })?;
                    let at = SystemTime::now().checked_add(after).ok_or_else(|| {
                        Failed::usage(format!("--expires {expires:?} is too far away"))
                    })?;
                    new.expires_ms = Some(millis(at));
                }
                let (token, secret) = match store.create_token(&new).await {
                    Ok(made) => made,
                    Err(StoreError::Invalid(e)) => return Err(Failed::usage(e)),
                    Err(e) => return Err(e.into()),
                };
                eprintln!(
                    "token {} ({}) made; it is shown this once:",
                    token.id, token.name
                );
                println!("{secret}");
                Ok(())
            }
            TokensCommand::List { json } => {
                let tokens = store.tokens().await?;
                if json {
                    print_json(&tokens);
                    return Ok(());
                }
                println!(
                    "{:<36}  {:<16}  {:<32}  {:>8}  {:<24}  state",
                    "id", "name", "scopes", "rate/s", "expires"
                );
                let now = millis(SystemTime::now());
                for t in &tokens {
                    let scopes: Vec<String> = t.scopes.iter().map(Scope::to_string).collect();
                    let state = match (t.revoked_ms, t.is_live(now)) {
                        (Some(at), _) => format!("revoked {}", time(at)),
                        (None, false) => "expired".into(),
                        (None, true) => "live".into(),
                    };
                    println!(
                        "{:<36}  {:<16}  {:<32}  {:>8}  {:<24}  {state}",
                        t.id,
                        t.name,
                        scopes.join(" "),
                        t.rate_per_second.map_or("-".into(), |r| r.to_string()),
                        t.expires_ms.map_or("never".into(), time),
                    );
                }
                Ok(())
            }
            TokensCommand::Revoke { id } => match store.revoke_token(&id).await? {
                true => {
                    println!("token {id} revoked");
                    Ok(())
                }
                false => Err(Failed::not_found(format!("no live token {id:?}"))),
            },
        }
    }
    .await;
    store.close().await;
    result
}

#[cfg(test)]
mod tests {
    use super::per_second;

    #[test]
    fn rates_read_per_second_or_minute() {
        assert_eq!(per_second("100/s").ok(), Some(100));
        assert_eq!(per_second("120/min").ok(), Some(2));
        assert!(per_second("90/min").is_err(), "not whole per second");
        assert_eq!(per_second("7").ok(), Some(7));
        for bad in ["0/s", "x/s", "10/h", "-1/s", ""] {
            assert!(per_second(bad).is_err(), "{bad}");
        }
    }
}
