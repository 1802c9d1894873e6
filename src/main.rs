fn main() { println!("{}", specauf::version()); }
