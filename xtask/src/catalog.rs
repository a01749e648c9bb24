//! Where the benchmarks and weights come from: one table of URLs, sizes and checksums.
//!
//! Every value here is data: tests build their own [`Dataset`]s pointing at a local
//! server, and `--mirror` / `--from-archive` replace the sources at run time.

/// How a downloaded file becomes a dataset folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    /// gzip-compressed tar.
    TarGz,
    /// zip.
    Zip,
    /// A plain file, copied as it is.
    Raw,
}

/// One file to obtain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// File name (also the name looked up on a mirror and among `--from-archive` files).
    pub file_name: String,
    /// Official download URLs, tried in order (empty when none is alive).
    pub urls: Vec<String>,
    /// Size in bytes, when known.
    pub size: Option<u64>,
    /// Expected MD5, lowercase hex.
    pub md5: Option<String>,
    /// Expected SHA-256, lowercase hex.
    pub sha256: Option<String>,
    /// No checksum is published: the SHA-256 of the first download is printed and
    /// recorded in the marker (trust on first use), so that it can be compared later.
    pub trust_on_first_use: bool,
    /// What to do with it.
    pub kind: ArchiveKind,
}

/// A dataset or weight file set, with what a user must know before downloading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    /// Short name used on the command line (`cub`, `cars`, `sop`, `bn-inception`).
    pub key: String,
    /// Full name.
    pub title: String,
    /// Homepage.
    pub homepage: String,
    /// How to cite it.
    pub citation: String,
    /// Terms of use, as the authors state them.
    pub terms: String,
    /// Files to obtain.
    pub artifacts: Vec<Artifact>,
    /// Folder under `--dest` that receives the extracted files.
    pub folder: String,
    /// The dataset root inside that folder (what `--data-dir` should point at).
    pub data_root: String,
    /// Printed when no official source exists and none was given.
    pub how_to_obtain: Option<String>,
    /// The command that uses the data, printed at the end (`{root}` = the data root).
    pub next_step: String,
}

fn s(v: &str) -> String {
    v.to_string()
}

/// The built-in table.
pub fn catalog() -> Vec<Dataset> {
    let research_terms = "The images are third-party content collected from the web; the \
        authors provide them for non-commercial research and educational use only. nofuss \
        does not redistribute them: they are downloaded from the source below, and you are \
        responsible for complying with the dataset's terms.";
    vec![
        Dataset {
            key: s("cub"),
            title: s("Caltech-UCSD Birds-200-2011 (CUB-200-2011)"),
            homepage: s("https://www.vision.caltech.edu/datasets/cub_200_2011/"),
            citation: s("C. Wah, S. Branson, P. Welinder, P. Perona, S. Belongie. The Caltech-UCSD \
                Birds-200-2011 Dataset. Technical Report CNS-TR-2011-001, California Institute of Technology, 2011."),
            terms: s(research_terms),
            artifacts: vec![Artifact {
                file_name: s("CUB_200_2011.tgz"),
                urls: vec![s("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz")],
                size: Some(1_150_585_339),
                md5: Some(s("97eceeb196236b17998738112f37df78")),
                sha256: Some(s("0c685df5597a8b24909f6a7c9db6d11e008733779a671760afef78feb49bf081")),
                trust_on_first_use: false,
                kind: ArchiveKind::TarGz,
            }],
            folder: s("cub"),
            data_root: s("CUB_200_2011"),
            how_to_obtain: None,
            next_step: s("cargo run --release -p nofuss -- train --dataset cub --data-dir {root} --channels 3 --image-size 64"),
        },
        Dataset {
            key: s("sop"),
            title: s("Stanford Online Products"),
            homepage: s("https://cvgl.stanford.edu/projects/lifted_struct/"),
            citation: s("H. O. Song, Y. Xiang, S. Jegelka, S. Savarese. Deep Metric Learning via Lifted \
                Structured Feature Embedding. CVPR 2016."),
            terms: s(research_terms),
            artifacts: vec![Artifact {
                file_name: s("Stanford_Online_Products.zip"),
                urls: vec![s("http://ftp.cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip")],
                size: Some(3_083_860_082),
                md5: Some(s("7f73d41a2f44250d4779881525aea32e")),
                sha256: Some(s("b04fa78210e69fab050ce73939550e1cd0f96890bdd98ec9fee732c3b756ef48")),
                trust_on_first_use: false,
                kind: ArchiveKind::Zip,
            }],
            folder: s("sop"),
            data_root: s("Stanford_Online_Products"),
            how_to_obtain: None,
            next_step: s("cargo run --release -p nofuss -- train --dataset sop --data-dir {root} --channels 3 --image-size 64"),
        },
        Dataset {
            key: s("cars"),
            title: s("Cars196 (Stanford Cars)"),
            homepage: s("https://ai.stanford.edu/~jkrause/cars/car_dataset.html"),
            citation: s("J. Krause, M. Stark, J. Deng, L. Fei-Fei. 3D Object Representations for \
                Fine-Grained Categorization. 4th IEEE Workshop on 3D Representation and Recognition, ICCV 2013."),
            terms: s(research_terms),
            artifacts: vec![
                Artifact {
                    file_name: s("car_ims.tgz"),
                    urls: vec![],
                    size: None,
                    md5: Some(s("d5c8f0aa497503f355e17dc7886c3f14")),
                    sha256: None,
                    trust_on_first_use: false,
                    kind: ArchiveKind::TarGz,
                },
                Artifact {
                    file_name: s("cars_annos.mat"),
                    urls: vec![],
                    size: None,
                    md5: Some(s("b407c6086d669747186bd1d764ff9dbc")),
                    sha256: None,
                    trust_on_first_use: false,
                    kind: ArchiveKind::Raw,
                },
            ],
            folder: s("cars"),
            data_root: s("."),
            how_to_obtain: Some(s("Every official Stanford URL for Cars196 is dead. Obtain car_ims.tgz and \
                cars_annos.mat (the files of the original release; their MD5 sums are checked) and pass \
                them with --from-archive PATH (once per file), or serve them from a mirror you trust \
                with --mirror URL (the file names are appended to it).")),
            next_step: s("cargo run --release -p nofuss -- train --dataset cars --data-dir {root} --channels 3 --image-size 64"),
        },
        Dataset {
            key: s("bn-inception"),
            title: s("BN-Inception ImageNet weights (Cadene's pretrainedmodels port)"),
            homepage: s("https://github.com/Cadene/pretrained-models.pytorch"),
            citation: s("S. Ioffe, C. Szegedy. Batch Normalization: Accelerating Deep Network Training by \
                Reducing Internal Covariate Shift. ICML 2015."),
            terms: s("Released with the pretrainedmodels package (BSD-3-Clause); weights converted from \
                the Caffe model of Xiong et al. Use them under those terms."),
            artifacts: vec![Artifact {
                file_name: s("bn_inception-52deb4733.pth"),
                urls: vec![s("http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth")],
                size: None,
                md5: None,
                sha256: None,
                // No public reference publishes this file's checksum (the reproductions load
                // it with model_zoo.load_url, which checks nothing), and the digits in its
                // name are not reliably a SHA-256 prefix: record it on first download.
                trust_on_first_use: true,
                kind: ArchiveKind::Raw,
            }],
            folder: s("weights/bn-inception"),
            data_root: s("bn_inception-52deb4733.pth"),
            how_to_obtain: None,
            next_step: s("cargo run --release -p nofuss -- train --backbone bn-inception --weights {root} --channels 3 --image-size 224 --dataset cub --data-dir <CUB_200_2011>"),
        },
    ]
}

/// Looks a dataset up by key.
pub fn find(catalog: &[Dataset], key: &str) -> Option<Dataset> {
    catalog.iter().find(|d| d.key == key).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_is_verifiable() {
        for d in catalog() {
            assert!(!d.homepage.is_empty() && !d.citation.is_empty() && !d.terms.is_empty());
            for a in &d.artifacts {
                assert!(
                    a.md5.is_some() || a.sha256.is_some() || a.trust_on_first_use,
                    "{} has no checksum",
                    a.file_name
                );
                for h in [&a.md5, &a.sha256].into_iter().flatten() {
                    assert!(h
                        .chars()
                        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
                }
                if a.urls.is_empty() {
                    assert!(
                        d.how_to_obtain.is_some(),
                        "{} has no source and no explanation",
                        d.key
                    );
                }
            }
        }
        assert!(find(&catalog(), "cub").is_some());
        assert!(find(&catalog(), "imagenet").is_none());
    }
}
