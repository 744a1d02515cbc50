//! A small, bounded XML tree for SOAP answers, and escaping for the requests we write.
//!
//! vSphere answers are typed by `xsi:type` attributes whose prefix varies by server (vCenter
//! writes `xsi:type`, the govmomi simulator `XMLSchema-instance:type`), so the tree keeps local
//! names only and [`Node::xsi_type`] finds the type whatever its prefix. Parsing is bounded: at
//! most [`MAX_NODES`] elements and [`MAX_DEPTH`] levels, on a body that the client already bounded
//! in bytes.

use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};
use virtrigaud_core::{Error, Result};

/// Most elements accepted in one answer.
pub const MAX_NODES: usize = 2_000_000;
/// Deepest nesting accepted.
pub const MAX_DEPTH: usize = 128;

/// One element: local name, the moref `type` attribute, the `xsi:type`, text and children.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    /// Local name (no prefix).
    pub name: String,
    /// The unprefixed `type` attribute (managed object references carry their type there).
    pub type_attr: Option<String>,
    /// The prefixed `…:type` attribute (`xsi:type`), without a namespace prefix in its value.
    pub xsi_type: Option<String>,
    /// Concatenated text content.
    pub text: String,
    /// Child elements, in order.
    pub children: Vec<Node>,
}

impl Node {
    /// First child named `name`.
    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }
    /// All children named `name`.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }
    /// Follows a path of child names.
    pub fn path(&self, path: &[&str]) -> Option<&Node> {
        let mut n = self;
        for p in path {
            n = n.child(p)?;
        }
        Some(n)
    }
    /// Text of the child at `path`, trimmed.
    pub fn text_at(&self, path: &[&str]) -> Option<&str> {
        self.path(path).map(|n| n.text.trim())
    }
    /// Parses the text of the child at `path`.
    pub fn parse_at<T: std::str::FromStr>(&self, path: &[&str]) -> Option<T> {
        self.text_at(path).and_then(|t| t.parse().ok())
    }
    /// The trimmed text.
    pub fn text(&self) -> &str {
        self.text.trim()
    }
    /// Depth-first search for the first element named `name` (self included).
    pub fn find(&self, name: &str) -> Option<&Node> {
        if self.name == name {
            return Some(self);
        }
        self.children.iter().find_map(|c| c.find(name))
    }
}

fn local(name: &[u8]) -> &[u8] {
    match name.iter().rposition(|&c| c == b':') {
        Some(i) => &name[i + 1..],
        None => name,
    }
}

fn start_node(e: &BytesStart<'_>) -> Result<Node> {
    let mut n = Node {
        name: String::from_utf8_lossy(local(e.name().as_ref())).into_owned(),
        ..Node::default()
    };
    for a in e.attributes() {
        let a = a.map_err(|err| Error::corrupt(format!("bad XML attribute: {err}")))?;
        let key = a.key.as_ref();
        if local(key) != b"type" {
            continue;
        }
        let v = a
            .unescape_value()
            .map_err(|err| Error::corrupt(format!("bad XML attribute value: {err}")))?
            .into_owned();
        if key.contains(&b':') {
            let v = match v.rsplit_once(':') {
                Some((_, t)) => t.to_string(),
                None => v,
            };
            n.xsi_type = Some(v);
        } else {
            n.type_attr = Some(v);
        }
    }
    Ok(n)
}

/// Parses a whole document into its root element.
pub fn parse(body: &[u8]) -> Result<Node> {
    let mut reader = Reader::from_reader(body);
    let mut stack: Vec<Node> = Vec::new();
    let mut count = 0usize;
    let mut root: Option<Node> = None;
    let mut buf = Vec::new();
    loop {
        let ev = reader
            .read_event_into(&mut buf)
            .map_err(|e| Error::corrupt(format!("malformed XML from the server: {e}")))?;
        match ev {
            Event::Start(e) => {
                count += 1;
                if count > MAX_NODES || stack.len() >= MAX_DEPTH {
                    return Err(Error::corrupt(format!(
                        "server answer too large: more than {MAX_NODES} elements or \
                         {MAX_DEPTH} levels"
                    )));
                }
                stack.push(start_node(&e)?);
            }
            Event::Empty(e) => {
                count += 1;
                if count > MAX_NODES {
                    return Err(Error::corrupt("server answer has too many elements"));
                }
                let n = start_node(&e)?;
                match stack.last_mut() {
                    Some(p) => p.children.push(n),
                    None => root = Some(n),
                }
            }
            Event::End(_) => {
                let n = stack
                    .pop()
                    .ok_or_else(|| Error::corrupt("unbalanced XML from the server"))?;
                match stack.last_mut() {
                    Some(p) => p.children.push(n),
                    None => root = Some(n),
                }
            }
            Event::Text(t) => {
                if let Some(top) = stack.last_mut() {
                    let s = t
                        .unescape()
                        .map_err(|e| Error::corrupt(format!("bad XML text: {e}")))?;
                    top.text.push_str(&s);
                }
            }
            Event::CData(t) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&String::from_utf8_lossy(&t));
                }
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    if !stack.is_empty() {
        return Err(Error::corrupt("truncated XML from the server"));
    }
    root.ok_or_else(|| Error::corrupt("empty XML answer from the server"))
}

/// Escapes text for an element body or attribute value.
pub fn esc(s: &str) -> String {
    quick_xml::escape::escape(s).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_names_and_both_type_attributes() {
        let x = br#"<?xml version="1.0"?><a:Envelope xmlns:a="x"><a:Body>
            <val xmlns:XMLSchema-instance="i" XMLSchema-instance:type="xsd:string">DC0 &amp; x</val>
            <obj type="VirtualMachine">vm-1</obj><e/></a:Body></a:Envelope>"#;
        let n = parse(x).unwrap();
        assert_eq!(n.name, "Envelope");
        let b = n.child("Body").unwrap();
        assert_eq!(b.child("val").unwrap().xsi_type.as_deref(), Some("string"));
        assert_eq!(b.child("val").unwrap().text(), "DC0 & x");
        let o = b.child("obj").unwrap();
        assert_eq!(o.type_attr.as_deref(), Some("VirtualMachine"));
        assert_eq!(o.xsi_type, None);
        assert!(b.child("e").is_some());
    }

    #[test]
    fn malformed_and_deep_documents_fail() {
        assert!(parse(b"<a><b></a>").is_err());
        assert!(parse(b"<a><b>").is_err());
        let deep = "<a>".repeat(MAX_DEPTH + 1) + &"</a>".repeat(MAX_DEPTH + 1);
        assert!(parse(deep.as_bytes()).is_err());
    }

    #[test]
    fn escapes() {
        assert_eq!(esc("a<b>&\"c'"), "a&lt;b&gt;&amp;&quot;c&apos;");
    }
}
